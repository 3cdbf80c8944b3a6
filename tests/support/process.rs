//! Running the built `meshdns` binary as an operator would, reading where it listens from its
//! log, and keeping its log lines for assertions. The process is killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_meshdns");
/// How long the binary may take to load its clusters and bind.
pub const START_WAIT: Duration = Duration::from_secs(20);

pub struct Meshdns {
    child: Child,
    pub addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Meshdns {
    /// Starts `meshdns ARGS` (which should include `--listen 127.0.0.1:0`) and waits until it
    /// logs the address it listens on.
    pub fn start(args: &[&str]) -> Meshdns {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn meshdns");
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("listening for DNS") {
                        let addr = line
                            .split("addr=")
                            .nth(1)
                            .and_then(|rest| rest.split_whitespace().next());
                        if let Some(Ok(addr)) = addr.map(str::parse::<SocketAddr>) {
                            let _ = tx.send(addr);
                        }
                    }
                    lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }
        let addr = match rx.recv_timeout(START_WAIT) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "meshdns did not report its address: {:?}",
                    lines.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
        };
        Meshdns { child, addr, lines }
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
            std::thread::sleep(Duration::from_millis(20));
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
