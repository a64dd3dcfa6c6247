//! A scripted TCP peer run as its own process inside a test namespace, so every socket has a
//! known owner (pid, comm). The test sends one command per line and reads one reply per line.
use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Duration;

enum Sock {
    L(TcpListener),
    S(TcpStream),
}

fn errname(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        Some(libc::EPIPE) => "EPIPE".into(),
        Some(libc::EADDRINUSE) => "EADDRINUSE".into(),
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL".into(),
        Some(n) => format!("errno{n}"),
        None => e.kind().to_string().replace(' ', "_"),
    }
}

fn sockaddr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is a valid value; we fill the family-specific prefix.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than, and aligned for, a sockaddr_in.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than, and aligned for, a sockaddr_in6.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn check(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn new_socket(a: &SocketAddr) -> std::io::Result<libc::c_int> {
    let fam = if a.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2).
    check(unsafe { libc::socket(fam, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })
}

fn setopt(
    fd: libc::c_int,
    level: libc::c_int,
    opt: libc::c_int,
    val: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: valid fd and a 4-byte option value.
    check(unsafe { libc::setsockopt(fd, level, opt, &val as *const _ as *const libc::c_void, 4) })
        .map(|_| ())
}

fn listen(addr: &SocketAddr, backlog: i32, reuseport: bool) -> std::io::Result<TcpListener> {
    let fd = new_socket(addr)?;
    setopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if reuseport {
        setopt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    }
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid fd and sockaddr.
    check(unsafe { libc::bind(fd, &ss as *const _ as *const libc::sockaddr, len) })?;
    // SAFETY: a valid socket fd.
    check(unsafe { libc::listen(fd, backlog) })?;
    // SAFETY: we own fd.
    Ok(unsafe { TcpListener::from_raw_fd(fd) })
}

fn connect(addr: &SocketAddr, bind: Option<SocketAddr>) -> std::io::Result<TcpStream> {
    let fd = new_socket(addr)?;
    // SAFETY: we own fd; wrapping it first closes it on every error path.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    if let Some(b) = bind {
        setopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        let (ss, len) = sockaddr(&b);
        // SAFETY: valid fd and sockaddr of `len` bytes.
        check(unsafe { libc::bind(fd, &ss as *const _ as *const libc::sockaddr, len) })?;
    }
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid fd and sockaddr of `len` bytes.
    check(unsafe { libc::connect(fd, &ss as *const _ as *const libc::sockaddr, len) })?;
    Ok(s)
}

fn connect_nonblocking(addr: &SocketAddr, port: Option<u16>) -> std::io::Result<TcpStream> {
    let fd = new_socket(addr)?;
    // SAFETY: we own fd.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    if let Some(p) = port {
        setopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        let local: SocketAddr = if addr.is_ipv4() {
            SocketAddr::from(([127, 0, 0, 1], p))
        } else {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, p))
        };
        let (ss, len) = sockaddr(&local);
        // SAFETY: valid fd and sockaddr of `len` bytes.
        check(unsafe { libc::bind(fd, &ss as *const _ as *const libc::sockaddr, len) })?;
    }
    s.set_nonblocking(true)?;
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid fd and sockaddr.
    if unsafe { libc::connect(fd, &ss as *const _ as *const libc::sockaddr, len) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    s.set_nonblocking(false)?;
    Ok(s)
}

pub fn main(name: &str) -> ! {
    let cname = std::ffi::CString::new(name).expect("peer name");
    // SAFETY: PR_SET_NAME with a NUL-terminated string.
    unsafe { libc::prctl(libc::PR_SET_NAME, cname.as_ptr()) };
    let mut socks: HashMap<u32, Sock> = HashMap::new();
    let mut next = 1u32;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let w: Vec<&str> = line.split_whitespace().collect();
        let id = |i: usize| -> u32 { w.get(i).and_then(|s| s.parse().ok()).unwrap_or(0) };
        let reply: Result<String, String> = match w.as_slice() {
            ["pid"] => Ok(std::process::id().to_string()),
            [cmd @ ("listen" | "listen_rp"), addr, backlog] => {
                let a: SocketAddr = addr.parse().expect("listen address");
                match listen(&a, backlog.parse().expect("backlog"), *cmd == "listen_rp") {
                    Ok(l) => {
                        socks.insert(next, Sock::L(l));
                        next += 1;
                        Ok((next - 1).to_string())
                    }
                    Err(e) => Err(errname(&e)),
                }
            }
            ["accept", _] => match socks.get(&id(1)) {
                Some(Sock::L(l)) => match l.accept() {
                    Ok((s, peer)) => {
                        socks.insert(next, Sock::S(s));
                        next += 1;
                        Ok(format!("{} {}", next - 1, peer.port()))
                    }
                    Err(e) => Err(errname(&e)),
                },
                _ => Err("nosock".into()),
            },
            ["connect", addr, rest @ ..] => {
                let a: SocketAddr = addr.parse().expect("connect address");
                let bind = rest.first().map(|b| b.parse().expect("bind address"));
                match connect(&a, bind) {
                    Ok(s) => {
                        let lport = s.local_addr().map(|l| l.port()).unwrap_or(0);
                        socks.insert(next, Sock::S(s));
                        next += 1;
                        Ok(format!("{} {lport}", next - 1))
                    }
                    Err(e) => Err(errname(&e)),
                }
            }
            // N non-blocking connects (from ports FIRST.. when given); replies with the ids.
            ["connect_nb", addr, n, rest @ ..] => {
                let a: SocketAddr = addr.parse().expect("connect address");
                let n: u16 = n.parse().expect("count");
                let first: Option<u16> = rest.first().map(|p| p.parse().expect("port"));
                let mut ids = Vec::new();
                let mut err = None;
                for i in 0..n {
                    match connect_nonblocking(&a, first.map(|p| p + i)) {
                        Ok(s) => {
                            socks.insert(next, Sock::S(s));
                            ids.push(next.to_string());
                            next += 1;
                        }
                        Err(e) => {
                            err = Some(errname(&e));
                            break;
                        }
                    }
                }
                match err {
                    Some(e) => Err(e),
                    None => Ok(ids.join(" ")),
                }
            }
            // The socket's pending error (SO_ERROR), e.g. after a non-blocking connect.
            ["soerror", _] => match socks.get(&id(1)) {
                Some(Sock::S(s)) => match s.take_error() {
                    Ok(Some(e)) => Ok(errname(&e)),
                    Ok(None) => Ok("none".into()),
                    Err(e) => Err(errname(&e)),
                },
                _ => Err("nosock".into()),
            },
            ["send", _, n] => match socks.get_mut(&id(1)) {
                Some(Sock::S(s)) => {
                    let buf = vec![b'x'; n.parse().expect("count")];
                    s.write_all(&buf)
                        .map(|_| "sent".to_string())
                        .map_err(|e| errname(&e))
                }
                _ => Err("nosock".into()),
            },
            ["recv", _, n] => match socks.get_mut(&id(1)) {
                Some(Sock::S(s)) => {
                    let want: usize = n.parse().expect("count");
                    let mut got = 0;
                    let mut buf = vec![0u8; want.max(1)];
                    loop {
                        match s.read(&mut buf[got..]) {
                            Ok(0) => break Ok(got.to_string()),
                            Ok(k) => {
                                got += k;
                                if got >= want {
                                    break Ok(got.to_string());
                                }
                            }
                            Err(e) => break Err(errname(&e)),
                        }
                    }
                }
                _ => Err("nosock".into()),
            },
            ["shutdown", _, how] => match socks.get(&id(1)) {
                Some(Sock::S(s)) => {
                    let how = match *how {
                        "wr" => std::net::Shutdown::Write,
                        "rd" => std::net::Shutdown::Read,
                        _ => std::net::Shutdown::Both,
                    };
                    s.shutdown(how)
                        .map(|_| "done".to_string())
                        .map_err(|e| errname(&e))
                }
                _ => Err("nosock".into()),
            },
            // connect(AF_UNSPEC): the kernel's tcp_disconnect (a RST to an established peer).
            ["disconnect", _] => match socks.get(&id(1)) {
                Some(Sock::S(s)) => {
                    // SAFETY: a zeroed sockaddr is valid; AF_UNSPEC needs nothing else.
                    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
                    sa.sa_family = libc::AF_UNSPEC as u16;
                    // SAFETY: valid fd, and a sockaddr of the length given.
                    let rc = unsafe {
                        libc::connect(
                            s.as_raw_fd(),
                            &sa,
                            std::mem::size_of::<libc::sockaddr>() as u32,
                        )
                    };
                    check(rc)
                        .map(|_| "done".to_string())
                        .map_err(|e| errname(&e))
                }
                _ => Err("nosock".into()),
            },
            ["linger0", _] => match socks.get(&id(1)) {
                Some(Sock::S(s)) => {
                    let l = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    // SAFETY: valid fd and linger struct.
                    let rc = unsafe {
                        libc::setsockopt(
                            s.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_LINGER,
                            &l as *const _ as *const libc::c_void,
                            std::mem::size_of::<libc::linger>() as u32,
                        )
                    };
                    check(rc)
                        .map(|_| "set".to_string())
                        .map_err(|e| errname(&e))
                }
                _ => Err("nosock".into()),
            },
            ["keepalive", _, idle, intvl, cnt] => match socks.get(&id(1)) {
                Some(Sock::S(s)) => {
                    let fd = s.as_raw_fd();
                    let p = |v: &str| v.parse::<i32>().expect("number");
                    setopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)
                        .and_then(|_| setopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, p(idle)))
                        .and_then(|_| setopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, p(intvl)))
                        .and_then(|_| setopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, p(cnt)))
                        .map(|_| "set".to_string())
                        .map_err(|e| errname(&e))
                }
                _ => Err("nosock".into()),
            },
            ["close", _] => match socks.remove(&id(1)) {
                Some(_) => Ok("closed".into()),
                None => Err("nosock".into()),
            },
            // N connect/accept/close cycles against our own listener: fast, deterministic churn.
            ["churn", _, n] => match socks.get(&id(1)) {
                Some(Sock::L(l)) => {
                    let addr = l.local_addr().expect("listener address");
                    let n: u32 = n.parse().expect("count");
                    let mut res = Ok(n.to_string());
                    for _ in 0..n {
                        let c = match connect(&addr, None) {
                            Ok(c) => c,
                            Err(e) => {
                                res = Err(errname(&e));
                                break;
                            }
                        };
                        let a = l.accept();
                        drop(c);
                        drop(a);
                    }
                    res
                }
                _ => Err("nosock".into()),
            },
            ["sleep", ms] => {
                std::thread::sleep(Duration::from_millis(ms.parse().expect("ms")));
                Ok("slept".into())
            }
            ["exit"] => std::process::exit(0),
            _ => Err(format!("bad command {line:?}")),
        };
        let text = match reply {
            Ok(v) => format!("ok {v}\n"),
            Err(e) => format!("err {e}\n"),
        };
        if out
            .write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            break;
        }
    }
    std::process::exit(0)
}
