//! The `gatesvr` binary's configuration handling: every example config in
//! deploy/config loads, and each kind of mistake exits 64 with a message that
//! names the key or file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn gatesvr() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gatesvr"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A working directory with what the example configs point at.
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    gatesvr_common::certs::ensure(
        &dir.path().join("certs/dev"),
        &[(gatesvr_common::identity::Role::DataPlane, "dp-jwt".into())],
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
    std::fs::write(dir.path().join("secrets/ops.token"), "0ps-t0ken").unwrap();
    std::fs::write(dir.path().join("secrets/hmac.key"), "dev-secret").unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(
        dir.path().join("secrets/jwt-es256.pub.pem"),
        key.public_key_pem(),
    )
    .unwrap();
    dir
}

fn check(plane: &str, config: &Path, cwd: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = gatesvr();
    cmd.args([plane, "--check", "--config"])
        .arg(config)
        .current_dir(cwd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn every_example_config_loads() {
    let cwd = workdir();
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("deploy/config")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let plane = if name.starts_with("dataplane") {
            "dataplane"
        } else if name.starts_with("controlplane") {
            "controlplane"
        } else {
            continue;
        };
        // Control-plane configs take their admin token from the environment,
        // as the documented cluster does.
        let env: &[(&str, &str)] = if plane == "controlplane" {
            &[("GATESVR_ADMIN__ADMIN_TOKEN", "t0ken")]
        } else {
            &[]
        };
        let out = check(plane, &path, cwd.path(), env);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        checked += 1;
    }
    assert!(checked >= 2, "found the example configs");
}

fn write(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

const BASE: &str = "server:\n  cert_file: certs/dev/server.crt\n  key_file: certs/dev/server.key\n  insecure_plaintext_internal: true\nauth:\n  secret_file: secrets/hmac.key\n";

#[test]
fn mistakes_exit_64_naming_the_key() {
    let cwd = workdir();
    let cases = [
        ("unknown key", format!("{BASE}zonez: 3\n"), "zonez"),
        (
            "bad duration",
            BASE.replace("server:\n", "server:\n  session_timeout: 5 fortnights\n"),
            "server.session_timeout",
        ),
        (
            "missing cert",
            BASE.replace("certs/dev/server.crt", "certs/nope.crt"),
            "certs/nope.crt",
        ),
        (
            "bad address",
            BASE.replace("server:\n", "server:\n  quic_addr: localhost\n"),
            "server.quic_addr",
        ),
        (
            "auth none outside dev",
            BASE.replace("auth:\n", "auth:\n  mode: none\n"),
            "auth.mode",
        ),
    ];
    for (what, yaml, needle) in cases {
        let path = write(cwd.path(), "bad.yaml", &yaml);
        let out = check("dataplane", &path, cwd.path(), &[]);
        assert_eq!(out.status.code(), Some(64), "{what}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{what}: {}", stderr(&out));
    }
    // A missing config file.
    let out = check("dataplane", Path::new("/nonexistent.yaml"), cwd.path(), &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("/nonexistent.yaml"));
}

#[test]
fn environment_overrides_are_validated_too() {
    let cwd = workdir();
    let path = write(cwd.path(), "ok.yaml", BASE);
    let ok = check(
        "dataplane",
        &path,
        cwd.path(),
        &[("GATESVR_QUIC_ADDR", "0.0.0.0:9999")],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    let bad = check(
        "dataplane",
        &path,
        cwd.path(),
        &[("GATESVR_SERVER__ACK_TIMEOUT", "soon")],
    );
    assert_eq!(bad.status.code(), Some(64));
    assert!(
        stderr(&bad).contains("server.ack_timeout"),
        "{}",
        stderr(&bad)
    );
    assert!(
        stderr(&bad).contains("GATESVR_"),
        "names the env source: {}",
        stderr(&bad)
    );
}

#[test]
fn help_and_version() {
    for args in [
        &["--help"][..],
        &["--version"],
        &["dev", "--help"],
        &["certs", "--help"],
    ] {
        let out = gatesvr().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(!out.stdout.is_empty());
    }
}

#[test]
fn certs_command_writes_a_usable_set() {
    let dir = tempfile::tempdir().unwrap();
    let out = gatesvr()
        .args(["certs", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    gatesvr_common::tls::install_crypto_provider();
    let certs = gatesvr_common::certs::DevCerts {
        dir: dir.path().to_path_buf(),
    };
    gatesvr_common::tls::server_config(&certs.server()).unwrap();
    let dp = certs.role(gatesvr_common::identity::Role::DataPlane, "dp-1");
    gatesvr_common::tls::tonic_client_tls(&dp, "localhost").unwrap();

    // More identities from the same CA; the CA stays.
    let ca = std::fs::read(certs.ca_cert()).unwrap();
    let out = gatesvr()
        .args([
            "certs",
            "--role",
            "dataplane:dp-7",
            "--role",
            "upstream:chat",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(ca, std::fs::read(certs.ca_cert()).unwrap());
    let der = gatesvr_common::tls::load_certs(
        &certs
            .role(gatesvr_common::identity::Role::Upstream, "chat")
            .cert_file,
    )
    .unwrap();
    let id = gatesvr_common::identity::Identity::from_cert(der[0].as_ref()).unwrap();
    assert_eq!(id.uri(), "spiffe://gatesvr/upstream/chat");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = certs
            .role(gatesvr_common::identity::Role::DataPlane, "dp-7")
            .key_file;
        let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let bad = gatesvr()
        .args(["certs", "--role", "king:me", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
}
