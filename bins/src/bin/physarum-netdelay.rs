//! Delays the packets of one netfilter queue by a set time: `tc netem delay` for
//! kernels built without the netem qdisc. An iptables rule hands packets to the
//! queue (`-j NFQUEUE --queue-num N --queue-bypass`); this program releases each
//! one, in the order they came, once it has waited the delay. Test tooling: the
//! multi-host tests run it inside a container's network namespace (nsenter).
//!
//! Usage: `physarum-netdelay QUEUE DELAY_FILE` — DELAY_FILE holds the delay in
//! milliseconds and is read again every 100 ms, so the delay can change while it
//! runs; the delay in force is written to DELAY_FILE.applied, so a caller can wait
//! for a change to take effect. Packets are released on time to within about a
//! millisecond.

use nfq::{Queue, Verdict};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// More packets than this in flight and the kernel lets the rest pass undelayed
/// (fail-open) rather than drop them.
const MAX_HELD: u32 = 8192;
const REREAD_DELAY: Duration = Duration::from_millis(100);
const IDLE_POLL: Duration = Duration::from_micros(200);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(queue), Some(file)) = (args.get(1).and_then(|q| q.parse::<u16>().ok()), args.get(2)) else {
        eprintln!("usage: physarum-netdelay QUEUE DELAY_FILE (the delay in milliseconds)");
        std::process::exit(2);
    };
    if let Err(e) = run(queue, PathBuf::from(file)) {
        eprintln!("physarum-netdelay: {e}");
        std::process::exit(1);
    }
}

fn read_delay(file: &PathBuf) -> Option<(String, Duration)> {
    let text = std::fs::read_to_string(file).ok()?.trim().to_string();
    let delay = Duration::from_micros((text.parse::<f64>().ok()? * 1000.0) as u64);
    Some((text, delay))
}

fn applied_file(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".applied");
    PathBuf::from(name)
}

fn run(queue_num: u16, file: PathBuf) -> std::io::Result<()> {
    let mut queue = Queue::open()?;
    queue.bind(queue_num)?;
    // Only the verdict matters: copy no payload, take large segments whole.
    queue.set_copy_range(queue_num, 0)?;
    queue.set_recv_gso(queue_num, true)?;
    queue.set_queue_max_len(queue_num, MAX_HELD)?;
    queue.set_fail_open(queue_num, true)?;
    queue.set_nonblocking(true);
    let mut delay = Duration::ZERO;
    let mut applied = String::new();
    let mut next_read = Instant::now();
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    eprintln!("physarum-netdelay: delaying queue {queue_num} as {} says", file.display());
    loop {
        let now = Instant::now();
        if now >= next_read {
            if let Some((text, d)) = read_delay(&file) {
                if text != applied {
                    eprintln!("physarum-netdelay: delay {d:?}");
                    delay = d;
                    std::fs::write(applied_file(&file), &text)?;
                    applied = text;
                }
            }
            next_read = now + REREAD_DELAY;
        }
        let mut received = false;
        loop {
            match queue.recv() {
                Ok(mut msg) => {
                    msg.set_verdict(Verdict::Accept);
                    // Never before a packet that came earlier: order is kept when the delay shrinks.
                    let due = held.back().map_or(now + delay, |(last, _)| (*last).max(now + delay));
                    held.push_back((due, msg));
                    received = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            let (_, msg) = held.pop_front().expect("front exists");
            queue.verdict(msg)?;
        }
        if !received {
            let wait = held.front().map_or(IDLE_POLL, |(due, _)| due.saturating_duration_since(now).min(IDLE_POLL));
            std::thread::sleep(wait);
        }
    }
}
