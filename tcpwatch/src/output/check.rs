//! `tcpwatch check` reports: the human summary, the JSON document and JUnit XML.
use std::io::{self, Write};

use crate::model::check::{Report, Verdict};

fn verdict_line(r: &Report) -> String {
    let failed = r.assertions.iter().filter(|a| !a.passed).count();
    let what = match r.verdict {
        Verdict::Pass => "PASS".to_string(),
        Verdict::Fail => format!("FAIL ({failed} of {} assertions)", r.assertions.len()),
        Verdict::CommandFailed => "COMMAND FAILED (assertions held)".to_string(),
        Verdict::Inconclusive => format!(
            "INCONCLUSIVE ({} events lost; --allow-loss accepts that)",
            loss_total(r)
        ),
    };
    format!("tcpwatch check: {what}, exit {}", r.exit_code)
}

fn loss_total(r: &Report) -> u64 {
    r.loss.kernel_dropped + r.loss.kernel_skipped + r.loss.channel_dropped + r.loss.decode_errors
}

fn command_status(r: &Report) -> String {
    match (r.command_exit.code, r.command_exit.signal) {
        (Some(c), _) => format!("exited {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "did not finish".into(),
    }
}

pub fn write_text<W: Write>(w: W, r: &Report) -> io::Result<()> {
    // Process names, sysctl values and capture contents reach the terminal escaped.
    let mut w = super::printable::Escaped::new(w);
    write_text_raw(&mut w, r)?;
    w.flush()
}

fn write_text_raw<W: Write>(mut w: W, r: &Report) -> io::Result<()> {
    writeln!(w, "{}", verdict_line(r))?;
    writeln!(
        w,
        "  command: {} {} after {:.1} s (then {:.1} s grace)",
        shell_words(&r.command),
        command_status(r),
        (r.duration_s - r.grace_s).max(0.0),
        r.grace_s
    )?;
    writeln!(w, "  scope: {}", r.scope)?;
    let o = &r.observed;
    writeln!(
        w,
        "  seen: {} events on {} sockets; retransmits syn {} synack {} data {} fin {}; resets {} sent {} received; TIME_WAIT peak {} ({} entered); listen overflows {}",
        o.events,
        o.sockets,
        o.retransmits.get("syn").copied().unwrap_or(0),
        o.retransmits.get("synack").copied().unwrap_or(0),
        o.retransmits.get("data").copied().unwrap_or(0),
        o.retransmits.get("fin").copied().unwrap_or(0),
        o.resets_sent,
        o.resets_received,
        o.time_wait_peak,
        o.time_wait_entered,
        o.overflows.iter().map(|x| x.count).sum::<u64>()
    )?;
    if r.assertions.is_empty() {
        writeln!(w, "  no assertions given: report only")?;
    }
    for a in &r.assertions {
        writeln!(
            w,
            "  {} {:<28} {} (limit: {})",
            if a.passed { "ok  " } else { "FAIL" },
            a.name,
            a.observed,
            a.limit
        )?;
        for d in &a.details {
            writeln!(w, "         {d}")?;
        }
        if !a.passed && !a.governed_by.is_empty() {
            writeln!(
                w,
                "         governed by: {}",
                crate::output::snapshot::governors(&a.governed_by)
            )?;
        }
    }
    let lost = loss_total(r);
    writeln!(
        w,
        "  lost events: {lost} (kernel ring full {}, skipped by the kernel {}, userspace {}, undecodable {})",
        r.loss.kernel_dropped, r.loss.kernel_skipped, r.loss.channel_dropped, r.loss.decode_errors
    )?;
    if !r.left_running.is_empty() {
        writeln!(
            w,
            "  still running after the grace period (left running): pid {}",
            r.left_running
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    for x in &r.warnings {
        writeln!(w, "  warning: {x}")?;
    }
    if !r.findings.is_empty() {
        writeln!(w, "  findings:")?;
        for f in &r.findings {
            crate::output::snapshot::write_finding(&mut w, f)?;
        }
    }
    Ok(())
}

pub fn write_json<W: Write>(mut w: W, r: &Report) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut w, r)?;
    writeln!(w)
}

fn shell_words(v: &[String]) -> String {
    v.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// XML attribute and text escaping; characters XML 1.0 cannot carry become U+FFFD.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            '\n' | '\t' => o.push(c),
            c if (c as u32) < 0x20 => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    o
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC, as JUnit's `timestamp` wants it.
fn iso8601(unix_s: f64) -> String {
    let secs = unix_s.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// JUnit XML: one test case per assertion, plus the command itself and event loss, so a CI
/// system shows each as its own line.
pub fn write_junit<W: Write>(mut w: W, r: &Report) -> io::Result<()> {
    struct Case {
        name: String,
        failure: Option<(String, String, &'static str)>,
        error: Option<(String, String)>,
    }
    let mut cases: Vec<Case> = r
        .assertions
        .iter()
        .map(|a| Case {
            name: a.name.clone(),
            failure: (!a.passed).then(|| {
                (
                    format!("observed {}, limit {}", a.observed, a.limit),
                    a.details.join("\n"),
                    "assertion",
                )
            }),
            error: None,
        })
        .collect();
    cases.push(Case {
        name: format!("command: {}", shell_words(&r.command)),
        failure: (!r.command_exit.success).then(|| (command_status(r), String::new(), "command")),
        error: None,
    });
    let lost = loss_total(r);
    cases.push(Case {
        name: "no lost events".into(),
        failure: None,
        error: (lost > 0 && !r.allow_loss).then(|| {
            (
                format!("{lost} events lost: the result is inconclusive"),
                format!(
                    "kernel ring full {}, skipped by the kernel {}, userspace {}, undecodable {}",
                    r.loss.kernel_dropped,
                    r.loss.kernel_skipped,
                    r.loss.channel_dropped,
                    r.loss.decode_errors
                ),
            )
        }),
    });
    let failures = cases.iter().filter(|c| c.failure.is_some()).count();
    let errors = cases.iter().filter(|c| c.error.is_some()).count();
    let time = format!("{:.3}", r.duration_s);
    writeln!(w, r#"<?xml version="1.0" encoding="UTF-8"?>"#)?;
    writeln!(
        w,
        r#"<testsuites name="tcpwatch check" tests="{}" failures="{failures}" errors="{errors}" time="{time}">"#,
        cases.len()
    )?;
    writeln!(
        w,
        r#"  <testsuite name="tcpwatch check" tests="{}" failures="{failures}" errors="{errors}" skipped="0" time="{time}" timestamp="{}" hostname="{}">"#,
        cases.len(),
        iso8601(r.started_unix_s),
        esc(&r.host)
    )?;
    writeln!(w, "    <properties>")?;
    for (k, v) in [
        ("command", shell_words(&r.command)),
        ("scope", r.scope.clone()),
        ("kernel", r.kernel.clone()),
        ("verdict", format!("{:?}", r.verdict)),
    ] {
        writeln!(w, r#"      <property name="{k}" value="{}"/>"#, esc(&v))?;
    }
    writeln!(w, "    </properties>")?;
    for c in &cases {
        let open = format!(
            r#"    <testcase name="{}" classname="tcpwatch.check" time="{time}""#,
            esc(&c.name)
        );
        match (&c.failure, &c.error) {
            (None, None) => writeln!(w, "{open}/>")?,
            (f, e) => {
                writeln!(w, "{open}>")?;
                if let Some((msg, body, ty)) = f {
                    writeln!(
                        w,
                        r#"      <failure message="{}" type="{ty}">{}</failure>"#,
                        esc(msg),
                        esc(body)
                    )?;
                }
                if let Some((msg, body)) = e {
                    writeln!(
                        w,
                        r#"      <error message="{}" type="loss">{}</error>"#,
                        esc(msg),
                        esc(body)
                    )?;
                }
                writeln!(w, "    </testcase>")?;
            }
        }
    }
    let mut summary = Vec::new();
    write_text(&mut summary, r)?;
    writeln!(
        w,
        "    <system-out>{}</system-out>",
        esc(&String::from_utf8_lossy(&summary))
    )?;
    writeln!(w, "  </testsuite>")?;
    writeln!(w, "</testsuites>")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::check::{Assertion, CommandExit, Observed};
    use crate::model::snapshot::LossView;

    fn report(pass: bool, lost: u64) -> Report {
        Report {
            version: 1,
            verdict: if pass { Verdict::Pass } else { Verdict::Fail },
            exit_code: if pass { 0 } else { 1 },
            command: vec!["sh".into(), "-c".into(), "run <tests> & 'x'".into()],
            command_exit: CommandExit {
                code: Some(0),
                signal: None,
                success: true,
            },
            started_unix_s: 1_796_137_200.5,
            duration_s: 3.25,
            grace_s: 1.0,
            scope: "the command's process tree (cgroup /tcpwatch-check-1)".into(),
            host: "ci&1".into(),
            kernel: "6.18.0".into(),
            hooks: vec![],
            assertions: vec![
                Assertion {
                    name: "--max-retransmits 0".into(),
                    limit: "at most 0".into(),
                    observed: "syn 0, synack 0, data 0, fin 0".into(),
                    passed: true,
                    details: vec![],
                    findings: vec![],
                    governed_by: vec![],
                },
                Assertion {
                    name: "--no-listen-overflow".into(),
                    limit: "none".into(),
                    observed: if pass { "0" } else { "24" }.into(),
                    passed: pass,
                    details: if pass {
                        vec![]
                    } else {
                        vec!["listener 127.0.0.1:8080 (42/srv): 24 accept queue overflow(s) (queue 3/2), dropped".into()]
                    },
                    findings: vec![crate::model::findings::FindingId::AcceptQueueOverflow],
                    governed_by: vec![crate::model::findings::Governor {
                        name: "net.core.somaxconn".into(),
                        value: Some("4096".into()),
                    }],
                },
            ],
            observed: Observed::default(),
            findings: vec![],
            loss: LossView {
                kernel_dropped: lost,
                ..LossView::default()
            },
            allow_loss: false,
            left_running: vec![],
            warnings: vec![],
        }
    }

    #[test]
    fn dates() {
        assert_eq!(iso8601(0.0), "1970-01-01T00:00:00");
        assert_eq!(iso8601(951_782_400.0), "2000-02-29T00:00:00");
        assert_eq!(iso8601(1_796_137_200.5), "2026-12-01T15:00:00");
    }

    #[test]
    fn text_summary() {
        let mut b = Vec::new();
        write_text(&mut b, &report(false, 0)).unwrap();
        let t = String::from_utf8(b).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "tcpwatch check: FAIL (1 of 2 assertions), exit 1");
        assert_eq!(
            lines[1],
            "  command: sh -c 'run <tests> & '\\''x'\\''' exited 0 after 2.2 s (then 1.0 s grace)"
        );
        assert!(t.contains("  ok   --max-retransmits 0          syn 0, synack 0, data 0, fin 0 (limit: at most 0)"), "{t}");
        assert!(t.contains("  FAIL --no-listen-overflow         24 (limit: none)\n         listener 127.0.0.1:8080"), "{t}");
        assert!(t.contains("  lost events: 0 "), "{t}");
        // A failed assertion names what governs it, from the findings catalogue.
        assert!(
            t.contains("         governed by: net.core.somaxconn = 4096\n"),
            "{t}"
        );
    }

    /// The structure JUnit consumers require (the Jenkins / Surefire schema): a testsuites
    /// root, testsuite with name, tests, failures, errors, time; testcase with name and
    /// classname; failure/error with message and type; counts that match the cases.
    fn validate(xml: &str) -> roxmltree::Document<'_> {
        let doc = roxmltree::Document::parse(xml).expect("well-formed XML");
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "testsuites");
        let suites: Vec<_> = root.children().filter(|n| n.is_element()).collect();
        assert_eq!(suites.len(), 1);
        let s = suites[0];
        assert_eq!(s.tag_name().name(), "testsuite");
        for a in [
            "name",
            "tests",
            "failures",
            "errors",
            "skipped",
            "time",
            "timestamp",
            "hostname",
        ] {
            assert!(s.attribute(a).is_some(), "testsuite lacks {a}");
        }
        let cases: Vec<_> = s
            .children()
            .filter(|n| n.has_tag_name("testcase"))
            .collect();
        assert_eq!(
            s.attribute("tests").unwrap().parse::<usize>().unwrap(),
            cases.len()
        );
        let count = |tag: &str| {
            cases
                .iter()
                .filter(|c| c.children().any(|n| n.has_tag_name(tag)))
                .count()
        };
        assert_eq!(
            s.attribute("failures").unwrap().parse::<usize>().unwrap(),
            count("failure")
        );
        assert_eq!(
            s.attribute("errors").unwrap().parse::<usize>().unwrap(),
            count("error")
        );
        assert_eq!(root.attribute("tests"), s.attribute("tests"));
        for c in &cases {
            assert!(c.attribute("name").is_some() && c.attribute("classname").is_some());
            c.attribute("time").unwrap().parse::<f64>().unwrap();
            for f in c
                .children()
                .filter(|n| n.has_tag_name("failure") || n.has_tag_name("error"))
            {
                assert!(f.attribute("message").is_some() && f.attribute("type").is_some());
            }
        }
        let order: Vec<&str> = s
            .children()
            .filter(|n| n.is_element())
            .map(|n| n.tag_name().name())
            .collect();
        assert_eq!(order.first(), Some(&"properties"));
        assert_eq!(order.last(), Some(&"system-out"));
        s.attribute("time").unwrap().parse::<f64>().unwrap();
        doc
    }

    #[test]
    fn junit_passing_run() {
        let mut b = Vec::new();
        write_junit(&mut b, &report(true, 0)).unwrap();
        let x = String::from_utf8(b).unwrap();
        let doc = validate(&x);
        let s = doc.root_element().first_element_child().unwrap();
        assert_eq!(s.attribute("tests"), Some("4"));
        assert_eq!(s.attribute("failures"), Some("0"));
        assert_eq!(s.attribute("hostname"), Some("ci&1"));
        assert_eq!(s.attribute("timestamp"), Some("2026-12-01T15:00:00"));
    }

    #[test]
    fn junit_failure_and_loss() {
        let mut b = Vec::new();
        write_junit(&mut b, &report(false, 12)).unwrap();
        let x = String::from_utf8(b).unwrap();
        let doc = validate(&x);
        let s = doc.root_element().first_element_child().unwrap();
        assert_eq!(
            (s.attribute("failures"), s.attribute("errors")),
            (Some("1"), Some("1"))
        );
        let f = doc
            .descendants()
            .find(|n| n.has_tag_name("failure"))
            .unwrap();
        assert_eq!(
            f.parent().unwrap().attribute("name"),
            Some("--no-listen-overflow")
        );
        assert_eq!(f.attribute("message"), Some("observed 24, limit none"));
        assert!(
            f.text()
                .unwrap()
                .starts_with("listener 127.0.0.1:8080 (42/srv)")
        );
        let e = doc.descendants().find(|n| n.has_tag_name("error")).unwrap();
        assert_eq!(
            e.attribute("message"),
            Some("12 events lost: the result is inconclusive")
        );
        let cmd = doc
            .descendants()
            .find(|n| {
                n.attribute("name")
                    .is_some_and(|v| v.starts_with("command: "))
            })
            .unwrap();
        assert_eq!(
            cmd.attribute("name"),
            Some("command: sh -c 'run <tests> & '\\''x'\\'''")
        );
    }
}
