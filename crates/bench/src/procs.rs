//! The processes a benchmark runs: started pinned to a CPU where `taskset`
//! exists, stopped when dropped, measured through `/proc`.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Which CPU each side runs on. On two or more cores the system under test
/// (gateway or nginx) gets CPU 0 to itself and the load side (load generator,
/// fake upstream, this process) CPU 1, so they do not steal from each other.
#[derive(Debug, Clone)]
pub struct Cpus {
    pub under_test: Option<String>,
    pub load: Option<String>,
}

impl Cpus {
    pub fn detect() -> Self {
        if allowed_cpus() >= 2 && which("taskset").is_some() {
            Self { under_test: Some("0".to_owned()), load: Some("1".to_owned()) }
        } else {
            Self { under_test: None, load: None }
        }
    }

    pub fn describe(&self) -> String {
        match (&self.under_test, &self.load) {
            (Some(t), Some(l)) => format!("system under test on CPU {t}; load generator and upstream on CPU {l}"),
            _ => "not pinned (taskset missing or a single CPU)".to_owned(),
        }
    }
}

/// CPUs this process may run on, from its affinity list (e.g. `0-1,4`).
/// The standard library's count also applies CPU quotas, which is not the
/// question here: pinning needs distinct CPUs.
pub fn allowed_cpus() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(list) = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")) else { return 1 };
    list.trim()
        .split(',')
        .map(|range| match range.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap_or(0).saturating_sub(a.parse().unwrap_or(0)) + 1,
            None => usize::from(!range.is_empty()),
        })
        .sum::<usize>()
        .max(1)
}

/// A program on PATH.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|p| p.is_file()))
}

/// `program args…`, under `taskset -c cpu` when a CPU is given.
pub fn pinned(cpu: Option<&str>, program: &Path) -> Command {
    match cpu {
        Some(cpu) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(cpu).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// A child process, killed when dropped with whatever it started (a
/// profiler given in `TOLLGATE_BENCH_WRAP` runs the gateway as its own
/// child, and does not pass the signal on).
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self { name: name.to_owned(), child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Listed before the signal: once the child exits, its children are
        // no longer listed as its own.
        let mut family = descendants(self.child.id());
        family.push(self.child.id());
        signal(&family, "-TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let descendants_gone = !family.iter().any(|&pid| alive(pid));
            if matches!(self.child.try_wait(), Ok(Some(_))) && descendants_gone {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        signal(&family, "-KILL");
        let _ = self.child.wait();
    }
}

/// Every process below `pid`, from `/proc`'s children lists.
fn descendants(pid: u32) -> Vec<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut all = Vec::new();
    for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
        all.extend(descendants(child));
        all.push(child);
    }
    all
}

/// Running, not gone or a zombie (whose parent has yet to reap it).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned)))
        .is_some_and(|state| state != "Z")
}

fn signal(pids: &[u32], which: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill").arg(which).args(pids.iter().map(u32::to_string)).status();
}

/// A port free on 127.0.0.1 now.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Waits until something accepts connections on `addr`.
pub async fn wait_listening(proc: &mut Proc, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if proc.exited() {
            bail!("{} exited before listening on {addr}", proc.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{} is not listening on {addr} after 60 s", proc.name)
}

/// Resident memory of a process and its children (nginx: master and
/// worker), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let own = status_field(pid, "VmRSS:").unwrap_or(0);
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    own + children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()).map(rss_kib).sum::<u64>()
}

/// CPU time (user and system) the process and its children have used, in
/// microseconds. /proc counts in USER_HZ, which is 100 on Linux.
pub fn cpu_us(pid: u32) -> u64 {
    let own = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which may hold spaces: state is
            // the first, utime the 12th and stime the 13th.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
        * 10_000;
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    own + children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()).map(cpu_us).sum::<u64>()
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
