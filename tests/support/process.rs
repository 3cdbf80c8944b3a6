//! Running the built `meshdns` binary as an operator would, keeping its log lines for
//! assertions and reading the addresses it reports. The process is killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_meshdns");
/// How long the binary may take to load its clusters and bind.
pub const START_WAIT: Duration = Duration::from_secs(20);

pub struct Meshdns {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// The thread reading stderr; it ends at the process's exit, once every line is in.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Meshdns {
    /// Starts `meshdns ARGS` with `RUST_LOG=rust_log`, collecting its stderr.
    pub fn spawn(args: &[&str], rust_log: &str) -> Meshdns {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn meshdns");
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        Meshdns {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// Starts `meshdns ARGS` (which should include `--listen 127.0.0.1:0`) and waits until it
    /// listens for DNS.
    pub fn start(args: &[&str]) -> Meshdns {
        let meshdns = Self::spawn(args, "info");
        meshdns.dns_addr();
        meshdns
    }

    pub fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until a log line contains every one of `needles`; panics after `limit`.
    pub fn wait_log(&self, needles: &[&str], limit: Duration) -> String {
        let started = Instant::now();
        loop {
            if let Some(line) = self.log().into_iter().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line;
            }
            assert!(
                started.elapsed() < limit,
                "no log line with {needles:?} in {:#?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The `addr=` of the first log line containing `needle`.
    pub fn logged_addr(&self, needle: &str, limit: Duration) -> SocketAddr {
        let line = self.wait_log(&[needle, "addr="], limit);
        line.split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line}"))
    }

    /// Where it answers DNS (UDP and TCP share the address).
    pub fn dns_addr(&self) -> SocketAddr {
        self.logged_addr("listening for DNS", START_WAIT)
    }

    /// Sends a signal by name (`TERM`, `INT`, `HUP`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name}");
    }

    /// Waits for the process to exit and for its last log lines to be read; panics after
    /// `limit`. (An exited process's lines may still be in the pipe: reading the log right
    /// after `try_wait` raced the reader thread.)
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for meshdns") {
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "meshdns still running after {limit:?}: {:#?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Meshdns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
