//! A store with the latency of a remote one, for measuring by hand: a proxy on loopback in front
//! of an S3 server on `PORT` that holds every request `MS` milliseconds before forwarding it.
//! Prints the proxy's port and runs until killed. benches/RESULTS.md used it to measure cold
//! reads behind 20 ms of latency:
//!
//!     cargo run --release -p cairn-testkit --example latency_proxy -- PORT MS

use std::time::Duration;

use cairn_testkit::faults::{FaultPlan, FaultProxy};

fn main() {
    let usage = "usage: latency_proxy PORT MILLISECONDS";
    let mut args = std::env::args().skip(1);
    let mut number = || -> u64 {
        args.next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{usage}"))
    };
    let (target, millis) = (number(), number());
    let target = u16::try_from(target).unwrap_or_else(|_| panic!("{usage}"));
    let proxy = FaultProxy::start(target, 1);
    proxy.set(FaultPlan {
        delay: 1.0,
        delay_for: Duration::from_millis(millis),
        ..FaultPlan::default()
    });
    println!("{}", proxy.port);
    loop {
        std::thread::park();
    }
}
