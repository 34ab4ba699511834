//! Runs the real keyward binary as a child process and captures its log output.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn keyward() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keyward"))
}

pub struct Spawned {
    pub child: Child,
    pub proxy: String,
    pub admin: String,
    pub logs: Arc<Mutex<String>>,
}

impl Spawned {
    /// Starts `keyward serve` with `args` and `env`, and waits (bounded) for its listening line.
    pub fn serve(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Spawned {
        Self::serve_command(keyward(), cwd, args, env, &[])
    }

    /// `serve`, with the variables named in `unset` removed from the inherited environment.
    pub fn serve_without(cwd: &Path, args: &[&str], env: &[(&str, &str)], unset: &[&str]) -> Spawned {
        Self::serve_command(keyward(), cwd, args, env, unset)
    }

    /// `serve` through `command`, which runs the binary (under `prlimit`, say), with the variables
    /// named in `unset` removed from the inherited environment.
    pub fn serve_command(
        mut command: Command,
        cwd: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        unset: &[&str],
    ) -> Spawned {
        command.arg("serve").args(args).current_dir(cwd).stdout(Stdio::null()).stderr(Stdio::piped());
        for key in unset {
            command.env_remove(key);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("keyward binary starts");
        let logs = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut logs = sink.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let started = Instant::now();
        loop {
            let text = logs.lock().unwrap().clone();
            if let Some(line) = text.lines().find(|l| l.contains("keyward listening")) {
                // `--log-format json` writes the fields as a JSON object.
                let json: Option<serde_json::Value> = serde_json::from_str(line).ok();
                let field = |name: &str| match &json {
                    Some(json) => json["fields"][name].as_str().unwrap().to_string(),
                    None => {
                        let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
                        line[start..].split_whitespace().next().unwrap().to_string()
                    }
                };
                return Spawned { proxy: field("proxy"), admin: field("admin"), child, logs };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("keyward exited with {status}:\n{text}");
            }
            assert!(started.elapsed() < Duration::from_secs(30), "keyward did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    pub fn terminate(mut self) -> String {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "keyward exited with {status}");
                std::thread::sleep(Duration::from_millis(50));
                return self.logs();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("keyward did not stop on SIGTERM:\n{}", self.logs());
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
