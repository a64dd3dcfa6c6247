//! `tcpwatch doctor`: privileges, which hook serves each signal on this kernel and why a
//! preferred one was refused, and how long start-up took.
use super::common::{EXIT_OK, probe_config, require_privileges};
use crate::cli::DoctorArgs;
use crate::ebpf::Probe;
use crate::settings::Filters;
use crate::source::host;

pub fn run(a: DoctorArgs) -> anyhow::Result<i32> {
    require_privileges()?;
    let cfg = probe_config(&a.probe, &Filters::default(), true);
    let mut probe = Probe::start(&cfg)?;
    println!("kernel: {}", host::kernel_release());
    for s in &probe.status {
        println!("{}", s.line());
    }
    // An instant snapshot loads no BPF when sock_diag answers: say whether it will.
    println!(
        "instant snapshot: {}",
        match &cfg.sock_diag {
            Ok(()) => "sock_diag, owners from /proc/*/fd (no BPF loaded)".to_string(),
            Err(e) => format!("the BPF inventory above (sock_diag: {e})"),
        }
    );
    let t: Vec<String> = probe
        .timings
        .iter()
        .map(|(w, d)| format!("{w} {:.0} ms", d.as_secs_f64() * 1e3))
        .collect();
    println!("start-up: {}", t.join(", "));
    // The programs' own diagnostics (a socket storage or map refusing an entry): a second of
    // this host's traffic shows whether any appear.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (lines, more) = probe.diagnostics();
    if lines.is_empty() {
        println!("kernel-side diagnostics: none in 1 s");
    }
    for l in lines {
        println!("{l}");
    }
    if more > 0 {
        println!("{more} more kernel-side diagnostics");
    }
    Ok(EXIT_OK)
}
