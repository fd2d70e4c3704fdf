//! The deployment files, checked without a Docker engine (none runs here): the Dockerfile's
//! promises, and docker-compose.yml against the Compose Specification's schema, with the
//! configuration it mounts passing ibstream's own validation.

mod common;

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_dockerfile_builds_a_small_non_root_image_of_the_binary() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let stages: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "a builder and a runtime stage: {stages:?}");
    assert!(stages[0].starts_with("FROM rust:") && stages[0].ends_with(" AS build"));
    assert!(
        stages[1].contains("debian:") && stages[1].contains("-slim"),
        "{}",
        stages[1]
    );
    let runtime: Vec<&&str> = lines
        .iter()
        .skip_while(|l| !l.starts_with("FROM debian"))
        .collect();
    let user = runtime
        .iter()
        .find(|l| l.starts_with("USER "))
        .expect("USER");
    let uid: u32 = user[5..]
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("numeric user");
    assert!(uid >= 10000, "{user}");
    assert!(runtime.contains(&&"ENTRYPOINT [\"ibstream\"]"));
    assert!(runtime.contains(&&"CMD [\"run\"]"));
    assert!(runtime
        .iter()
        .any(|l| l.starts_with("COPY --from=build") && l.ends_with("/usr/local/bin/ibstream")));
    for label in ["source", "version", "licenses"] {
        assert!(
            text.contains(&format!("org.opencontainers.image.{label}=")),
            "OCI label {label}"
        );
    }
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target/"));
}

#[test]
fn docker_compose_validates_and_its_configuration_passes_ibstream_s_own_check() {
    let out = Command::new(common::interop_python())
        .arg(root().join("tests/deploy/check_compose.py"))
        .arg(root().join("docker-compose.yml"))
        .arg(root().join("tests/data/compose-spec.json"))
        .output()
        .expect("python with pyyaml and jsonschema (./scripts/test.sh installs them)");
    assert!(
        out.status.success(),
        "docker-compose.yml: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let config = root().join(found["config"].as_str().unwrap());
    let mut check = Command::new(env!("CARGO_BIN_EXE_ibstream"));
    check
        .args(["check", "--config-only"])
        .env("IBSTREAM_CONFIG", &config);
    for (key, value) in found["environment"].as_object().unwrap() {
        if key != "IBSTREAM_CONFIG" {
            check.env(key, value.as_str().unwrap());
        }
    }
    let out = check.output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("delivery = \"exactly-once\""), "{stdout}");
    assert!(
        stdout.contains("url = \"http://schema-registry:8081\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("password_file = \"/run/secrets/crm_password\""),
        "{stdout}"
    );
}

#[test]
fn the_helm_chart_renders_lints_and_its_configuration_passes_ibstream_s_own_check() {
    let out = Command::new(common::interop_python())
        .arg(root().join("tests/deploy/check_chart.py"))
        .arg(root().join("helm/ibstream"))
        .output()
        .expect("python with helm-python-sdk and yamllint (./scripts/test.sh installs them)");
    assert!(
        out.status.success(),
        "helm/ibstream: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let rendered: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(rendered.len(), 2, "default and everything values");
    for values in rendered {
        let path = dir
            .path()
            .join(format!("{}.toml", values["values"].as_str().unwrap()));
        std::fs::write(&path, values["toml"].as_str().unwrap()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ibstream"))
            .args(["check", "--config-only"])
            .env("IBSTREAM_CONFIG", &path)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "the ConfigMap of the {} values: {}",
            values["values"],
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
