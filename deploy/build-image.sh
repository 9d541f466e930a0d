#!/usr/bin/env bash
# Builds the GateSvr container image (gatesvr:dev) without pulling anything.
#
#   deploy/build-image.sh [--tag NAME:TAG]... [--base IMAGE] [--no-cargo]
#
#   --tag NAME:TAG  also tag the image NAME:TAG (repeatable); gatesvr:dev is always set
#   --base IMAGE    use IMAGE as the base (e.g. gcr.io/distroless/cc-debian12:nonroot when a
#                   registry is reachable) instead of assembling gatesvr-base:local
#   --no-cargo      reuse the release binaries already in the target directory
#
# Steps:
#   1. cargo build --release of the four binaries on this host;
#   2. a build context with just the (stripped) binaries: deploy/Dockerfile COPYs them;
#   3. unless --base: a minimal root filesystem from this host's files (the binaries' shared
#      libraries found with ldd, the dynamic loader, NSS modules, /etc/passwd and /etc/group
#      with nonroot 65532, nsswitch.conf, CA certificates, /tmp, /home/nonroot), imported with
#      `docker import` as gatesvr-base:local: the same layout as distroless cc-debian12:nonroot;
#   4. docker build of deploy/Dockerfile with --build-arg BASE_IMAGE=<base>;
#   5. a smoke check: every binary answers --version as uid 65532.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=gatesvr:dev
LOCAL_BASE=gatesvr-base:local
BINS=(gatesvr gatectl gate-upstream gate-client)
tags=("$IMAGE")
base=""
run_cargo=1

die() { echo "build-image.sh: $*" >&2; exit 1; }
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --tag) [[ $# -ge 2 ]] || die "--tag needs a value"; tags+=("$2"); shift 2 ;;
        --tag=*) tags+=("${1#--tag=}"); shift ;;
        --base) [[ $# -ge 2 ]] || die "--base needs a value"; base="$2"; shift 2 ;;
        --base=*) base="${1#--base=}"; shift ;;
        --no-cargo) run_cargo=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot talk to the Docker engine (docker info failed)"

target_dir="${CARGO_TARGET_DIR:-target}"
release="$target_dir/release"

# --- 1. binaries -------------------------------------------------------------------------
if [[ $run_cargo == 1 ]]; then
    echo "== cargo build --release (gatesvr, gatectl, gate-upstream, gate-client)"
    cargo build --release --locked --bins -p gatesvr -p gatesvr-controlplane -p gate-upstream -p gatesvr-sdk
fi
for b in "${BINS[@]}"; do
    [[ -x "$release/$b" ]] || die "$release/$b is missing (run without --no-cargo)"
done

# --- 2. build context --------------------------------------------------------------------
work="$target_dir/image"
ctx="$work/context"
rm -rf "$work"
mkdir -p "$ctx/bin" "$ctx/var-lib-gatesvr"
for b in "${BINS[@]}"; do
    cp "$release/$b" "$ctx/bin/$b"
    if command -v strip >/dev/null; then strip --strip-unneeded "$ctx/bin/$b"; fi
    chmod 0755 "$ctx/bin/$b"
done
cp deploy/Dockerfile "$ctx/Dockerfile"

# --- 3. base image -----------------------------------------------------------------------
if [[ -z "$base" ]]; then
    echo "== assembling $LOCAL_BASE from this host's libraries"
    root="$work/rootfs"
    mkdir -p "$root"/{etc,tmp,home/nonroot,usr/local/bin,var/lib,etc/ssl/certs}

    copy_file() { # copy $1 (following links) to the same path under $root
        local src="$1"
        [[ -e "$src" ]] || return 0
        mkdir -p "$root$(dirname "$src")"
        cp -L "$src" "$root$src"
    }
    libs=()
    for b in "${BINS[@]}"; do
        # "libfoo.so => /lib/... (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"
        while read -r lib; do libs+=("$lib"); done < <(ldd "$ctx/bin/$b" | grep -o '/[^ ]*' | sort -u)
    done
    # glibc resolves users and hosts through NSS modules loaded at run time (not in ldd).
    libdir=$(dirname "$(ldd "$ctx/bin/gatesvr" | grep -o '/[^ ]*libc\.so\.[0-9]*' | head -1)")
    [[ -n "$libdir" && "$libdir" != "." ]] || die "cannot find libc of the binaries"
    for nss in "$libdir"/libnss_files.so.* "$libdir"/libnss_dns.so.* "$libdir"/libresolv.so.*; do
        [[ -e "$nss" ]] && libs+=("$nss")
    done
    for lib in $(printf '%s\n' "${libs[@]}" | sort -u); do copy_file "$lib"; done
    # Debian-style layout: /lib64 and /lib are real directories in the rootfs as copied.

    cat > "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
    cat > "$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
tty:x:5:
EOF
    cat > "$root/etc/nsswitch.conf" <<'EOF'
passwd:         files
group:          files
shadow:         files
hosts:          files dns
networks:       files
protocols:      files
services:       files
EOF
    [[ -f /etc/ssl/certs/ca-certificates.crt ]] || die "/etc/ssl/certs/ca-certificates.crt missing (apt-get install ca-certificates)"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    if [[ -f /etc/os-release ]]; then cp /etc/os-release "$root/etc/os-release"; fi
    : > "$root/etc/hosts"
    : > "$root/etc/resolv.conf"
    chmod 1777 "$root/tmp"
    chmod 0755 "$root/home/nonroot"

    # Root-owned everything, then nonroot's home appended with uid/gid 65532 (no root needed).
    tarball="$work/rootfs.tar"
    tar --numeric-owner --owner=0 --group=0 -C "$root" -cf "$tarball" --exclude=./home/nonroot .
    tar --numeric-owner --owner=65532 --group=65532 -C "$root" -rf "$tarball" ./home/nonroot
    docker import \
        --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'USER 65532:65532' \
        --change 'WORKDIR /home/nonroot' \
        --message 'gatesvr-base: minimal glibc rootfs assembled by deploy/build-image.sh' \
        "$tarball" "$LOCAL_BASE" >/dev/null
    base="$LOCAL_BASE"
fi

# --- 4. image ----------------------------------------------------------------------------
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
tag_args=()
for t in "${tags[@]}"; do tag_args+=(-t "$t"); done
echo "== docker build (BASE_IMAGE=$base) -> ${tags[*]}"
docker build --pull=false \
    --build-arg BASE_IMAGE="$base" \
    --build-arg VERSION="${version:-dev}" \
    --build-arg REVISION="$revision" \
    "${tag_args[@]}" "$ctx"

# --- 5. smoke check ----------------------------------------------------------------------
user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
[[ "$user" == "65532:65532" ]] || die "image user is '$user', expected 65532:65532"
for b in "${BINS[@]}"; do
    out=$(docker run --rm --network none "$IMAGE" "$b" --version) || die "$b --version failed in the image"
    echo "   $out"
done
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
echo "== built ${tags[*]}: base $base, user $user, $((size / 1024 / 1024)) MiB"
