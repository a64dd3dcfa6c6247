//! Aya errors in one line: the error chain joined, and of a verifier log only its verdict
//! (`TCPWATCH_VERIFIER_LOG=1` keeps the whole log, for debugging a refused program).

/// One line for an aya error: its chain joined, and of a verifier log only the verdict.
pub fn short(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    // TCPWATCH_VERIFIER_LOG=1 keeps the whole verifier log, for debugging a refused program.
    if std::env::var_os("TCPWATCH_VERIFIER_LOG").is_some() {
        return s;
    }
    one_line(&s)
}

pub fn one_line(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.len() <= 1 {
        return s.trim().to_string();
    }
    let head = lines[0]
        .split("Verifier output:")
        .next()
        .unwrap_or(lines[0])
        .trim_end();
    let verdict = lines
        .iter()
        .rev()
        .find(|l| {
            !(l.starts_with("verification time")
                || l.starts_with("stack depth")
                || l.starts_with("processed ")
                || l.starts_with(':'))
        })
        .copied()
        .unwrap_or("");
    format!("{head} verifier: {verdict}")
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn verifier_logs_shrink_to_the_verdict() {
        let log = "loading state_btf: the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: 0: R1=ctx()\n1: (79) r8 = *(u64 *)(r1 +16)\ninvalid size of register fill\nverification time 3098 usec\nstack depth 288+0+0\nprocessed 1995 insns\n: Permission denied (os error 13)";
        assert_eq!(
            one_line(log),
            "loading state_btf: the BPF_PROG_LOAD syscall returned Permission denied (os error 13). verifier: invalid size of register fill"
        );
        assert_eq!(one_line("plain error"), "plain error");
    }
}
