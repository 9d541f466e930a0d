{{/* Chart name, truncated to the 63 characters DNS labels allow. */}}
{{- define "gatesvr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full release name; kept short so "<fullname>-controlplane-headless" and pod names fit. */}}
{{- define "gatesvr.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 30 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 30 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gatesvr.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels; call with (dict "ctx" $ "component" "controlplane"). */}}
{{- define "gatesvr.labels" -}}
helm.sh/chart: {{ include "gatesvr.chart" .ctx }}
{{ include "gatesvr.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: gatesvr
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "gatesvr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gatesvr.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{- define "gatesvr.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gatesvr.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gatesvr.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Names of the control-plane objects. */}}
{{- define "gatesvr.cp.name" -}}{{ include "gatesvr.fullname" . }}-controlplane{{- end }}
{{- define "gatesvr.cp.headless" -}}{{ include "gatesvr.fullname" . }}-controlplane-headless{{- end }}
{{- define "gatesvr.dp.name" -}}{{ include "gatesvr.fullname" . }}-dataplane{{- end }}

{{/* Stable DNS name of control-plane pod N: call with (dict "ctx" $ "i" N). */}}
{{- define "gatesvr.cp.podHost" -}}
{{- printf "%s-%d.%s.%s.svc.%s" (include "gatesvr.cp.name" .ctx) (int .i) (include "gatesvr.cp.headless" .ctx) .ctx.Release.Namespace .ctx.Values.clusterDomain }}
{{- end }}

{{/* Raft node id of control-plane pod N: call with (dict "ctx" $ "i" N). */}}
{{- define "gatesvr.cp.nodeId" -}}
{{- $override := get .ctx.Values.controlplane.nodeIdOverrides (toString .i) }}
{{- if $override }}{{ int64 $override }}{{ else }}{{ add (int64 .ctx.Values.controlplane.nodeIdBase) .i }}{{ end }}
{{- end }}

{{/* In-cluster admin API URL (ClusterIP Service). */}}
{{- define "gatesvr.cp.adminUrl" -}}
{{- printf "https://%s.%s.svc.%s:8095" (include "gatesvr.cp.name" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* The certificate roles: control plane (raft peers + admin + data-plane API server),
     data plane (QUIC, its client certificate towards the control plane), upstream (clients
     of the control-plane and push APIs). */}}
{{- define "gatesvr.tlsRoles" -}}["controlplane","dataplane","upstream"]{{- end }}

{{/* Name of a role's certificate objects: (dict "ctx" $ "role" "x"). */}}
{{- define "gatesvr.tlsCommonName" -}}{{ include "gatesvr.fullname" .ctx }}-{{ .role }}{{- end }}

{{/* The identity a role's certificate names (docs/operations.md, Security): one certificate
     serves every pod of the role, so its id is `_any` (any node of that role; it still
     cannot act as another role). Helm's genSignedCert cannot write URI SANs, so generated
     certificates carry it as their subject CN; cert-manager ones as a SAN URI too. */}}
{{- define "gatesvr.spiffeId" -}}spiffe://{{ .ctx.Values.tls.trustDomain }}/{{ .role }}/_any{{- end }}

{{/* Secret holding a role's tls.crt, tls.key and ca.crt: (dict "ctx" $ "role" "x"). */}}
{{- define "gatesvr.tlsSecret" -}}
{{- $v := .ctx.Values.tls }}
{{- if eq $v.mode "existingSecret" }}
{{- $s := get $v.existingSecrets .role | default $v.existingSecret }}
{{- required (printf "tls.existingSecrets.%s (or tls.existingSecret for every role) is required when tls.mode is existingSecret" .role) $s }}
{{- else }}
{{- include "gatesvr.fullname" .ctx }}-{{ .role }}-tls
{{- end }}
{{- end }}

{{/* Certificate names the control plane accepts on raft RPCs (tls.raft_peer_names), as JSON. */}}
{{- define "gatesvr.raftPeerNames" -}}
{{- if .Values.tls.raftPeerNames }}
{{- toJson .Values.tls.raftPeerNames }}
{{- else if ne .Values.tls.mode "existingSecret" }}
{{- list (include "gatesvr.tlsCommonName" (dict "ctx" . "role" "controlplane")) | toJson }}
{{- else }}[]{{ end }}
{{- end }}
{{- define "gatesvr.authSecret" -}}
{{- default (printf "%s-auth" (include "gatesvr.fullname" .)) .Values.auth.existingSecret }}
{{- end }}
{{- define "gatesvr.adminSecret" -}}
{{- default (printf "%s-admin" (include "gatesvr.fullname" .)) .Values.controlplane.admin.existingSecret }}
{{- end }}
{{- define "gatesvr.quicKeysSecret" -}}
{{- default (printf "%s-quic-keys" (include "gatesvr.fullname" .)) .Values.dataplane.sharedKeys.existingSecret }}
{{- end }}

{{/* DNS names a generated or cert-manager certificate of a role covers:
     (dict "ctx" $ "role" "x"). Only the control-plane certificate carries control-plane
     names, so tls.raft_peer_names can tell it from the others. */}}
{{- define "gatesvr.tlsDnsNames" -}}
{{- $ns := .ctx.Release.Namespace }}
{{- $d := .ctx.Values.clusterDomain }}
{{- $full := include "gatesvr.fullname" .ctx }}
{{- $names := list }}
{{- if eq .role "controlplane" }}
{{- $cp := include "gatesvr.cp.name" .ctx }}
{{- $hl := include "gatesvr.cp.headless" .ctx }}
{{- $names = list "localhost" $cp (printf "%s.%s.svc" $cp $ns) (printf "%s.%s.svc.%s" $cp $ns $d) (printf "*.%s.%s.svc.%s" $hl $ns $d) (printf "*.%s.%s.svc" $hl $ns) }}
{{- else if eq .role "dataplane" }}
{{- $names = list "localhost" (include "gatesvr.dp.name" .ctx) (printf "%s-push.%s.svc" $full $ns) (printf "%s-push.%s.svc.%s" $full $ns $d) (printf "%s-quic.%s.svc.%s" $full $ns $d) }}
{{- $names = concat $names .ctx.Values.tls.extraDnsNames }}
{{- else }}
{{- $names = list (include "gatesvr.tlsCommonName" .) }}
{{- end }}
{{- $names | uniq | toJson }}
{{- end }}

{{/* Fails rendering on values that would give a broken cluster. */}}
{{- define "gatesvr.validate" -}}
{{- $dpc := .Values.dataplane.config | default dict }}
{{- $cpc := .Values.controlplane.config | default dict }}
{{- $plain := list }}
{{- if (get ($dpc.server | default dict) "insecure_plaintext_internal") }}{{ $plain = append $plain "dataplane.config.server.insecure_plaintext_internal" }}{{ end }}
{{- if (get ((get ($dpc.upstream | default dict) "tls") | default dict) "insecure_plaintext") }}{{ $plain = append $plain "dataplane.config.upstream.tls.insecure_plaintext" }}{{ end }}
{{- if (get ($dpc.control_plane | default dict) "insecure") }}{{ $plain = append $plain "dataplane.config.control_plane.insecure" }}{{ end }}
{{- if (get ($cpc.tls | default dict) "insecure") }}{{ $plain = append $plain "controlplane.config.tls.insecure" }}{{ end }}
{{- if and $plain (not .Values.insecurePlaintextInternal) }}
{{- fail (printf "refusing to render a PLAINTEXT internal hop (%s): anyone on the pod network could take sessions, push to any user or drive raft. Set insecurePlaintextInternal=true only for a throwaway test cluster." (join ", " $plain)) }}
{{- end }}
{{- $n := int .Values.controlplane.replicas }}
{{- if or (lt $n 1) (eq (mod $n 2) 0) }}
{{- fail (printf "controlplane.replicas must be odd (1, 3, 5, 7): %d would add no fault tolerance over %d and can split votes evenly" $n (sub $n 1)) }}
{{- end }}
{{- if le (int .Values.dataplane.terminationGracePeriodSeconds) (int .Values.dataplane.drain.deadlineSeconds) }}
{{- fail (printf "dataplane.terminationGracePeriodSeconds (%d) must exceed dataplane.drain.deadlineSeconds (%d): the preStop drain counts against the grace period" (int .Values.dataplane.terminationGracePeriodSeconds) (int .Values.dataplane.drain.deadlineSeconds)) }}
{{- end }}
{{- if and .Values.dataplane.controlPlane.enabled .Values.dataplane.staticUpstreams }}
{{- fail "dataplane.staticUpstreams must be empty while dataplane.controlPlane.enabled: a data plane joined to the control plane routes to the upstreams registered there (registration.upstreams, gate-upstream --control-plane)" }}
{{- end }}
{{- if and (eq .Values.tls.mode "certManager") (not .Values.tls.certManager.issuerRef.name) }}
{{- fail "tls.certManager.issuerRef.name is required when tls.mode is certManager" }}
{{- end }}
{{- if and (eq .Values.auth.mode "jwt") (ne .Values.auth.jwt.algorithm "HS256") (not .Values.auth.existingSecret) }}
{{- fail "auth.existingSecret (key jwt-public-key.pem) is required for auth.jwt.algorithm RS256/ES256" }}
{{- end }}
{{- end }}

{{/* Restricted container security context plus the pod-level one, shared by all pods. */}}
{{- define "gatesvr.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}
{{- define "gatesvr.securityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{/* Preferred or required anti-affinity across nodes: (dict "ctx" $ "component" "x" "mode" "soft"). */}}
{{- define "gatesvr.antiAffinity" -}}
{{- if eq .mode "hard" }}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "gatesvr.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 10 }}
{{- else if eq .mode "soft" }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "gatesvr.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 12 }}
{{- end }}
{{- end }}
