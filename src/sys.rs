//! The system calls that neither std, tokio nor socket2 wraps: the crate's only unsafe code
//! (`#![deny(unsafe_code)]` everywhere else). Each is a plain libc call on values we own.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

/// Keep freed heap memory for reuse instead of returning it to the kernel at once. Bulk data
/// passes through short-lived 32 KiB buffers; with glibc's default trim threshold (128 KiB)
/// the heap shrank and regrew with every burst, and the page faults of refilling it cost more
/// CPU than the copies themselves (docs/performance.md, "What the tuning found").
pub fn keep_freed_memory(bytes: usize) -> bool {
    #[cfg(target_env = "gnu")]
    {
        let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a tuning parameter of the allocator; called before any
        // other thread exists.
        unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, bytes) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        let _ = bytes;
        false
    }
}

/// Raise the soft limit on open files to the hard one, as most daemons do: each channel holds
/// a socket to its target, so 1,000 channels need more than the usual soft limit of 1,024.
pub fn raise_open_file_limit() -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass by valid pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
        }
    }
}

/// `setsockopt` with an int value (`SO_RCVLOWAT`, `TCP_NOTSENT_LOWAT`; see transport.rs).
pub fn set_int_option(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: usize,
) -> io::Result<()> {
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket descriptor, and a pointer to a c_int with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A TCP connection's `tcp_info` and how many of its bytes the kernel filled in (an older
/// kernel fills less of it); `None` if the descriptor is not a TCP socket.
fn tcp_info(socket: &impl AsRawFd) -> Option<(libc::tcp_info, usize)> {
    // SAFETY: tcp_info is plain integers, for which all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket descriptor, and a pointer to a tcp_info with its exact size;
    // an older kernel fills less of it and says so in `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((info, len as usize))
}

/// The kernel's round-trip time of a TCP connection: its recent minimum where the kernel keeps
/// one (Linux 4.6 and later), else its smoothed estimate; `None` before any was measured.
pub fn tcp_round_trip(socket: &impl AsRawFd) -> Option<std::time::Duration> {
    let (info, len) = tcp_info(socket)?;
    let has_min = len >= std::mem::offset_of!(libc::tcp_info, tcpi_min_rtt) + 4;
    let us = if has_min && info.tcpi_min_rtt > 0 && info.tcpi_min_rtt != u32::MAX {
        info.tcpi_min_rtt
    } else {
        info.tcpi_rtt
    };
    (us > 0).then(|| std::time::Duration::from_micros(u64::from(us)))
}

/// Whether a TCP connection has sent segments the peer has not acknowledged: what a silent
/// path or server looks like from our side (a session stuck at home sends nothing).
pub fn tcp_unacknowledged(socket: &impl AsRawFd) -> Option<bool> {
    tcp_info(socket).map(|(info, _)| info.tcpi_unacked > 0)
}

/// Have `cmd`'s process receive each of `fds` as descriptor 3, 4, ... (in order), open across
/// its exec, as systemd passes sockets (`LISTEN_FDS`): the handover's channel to the new
/// binary and the listeners it takes over (handover.rs).
pub fn pass_fds(cmd: &mut std::process::Command, fds: Vec<std::os::fd::RawFd>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls (dup, dup2, fcntl) on
    // descriptors this process owns; no allocation (`fds` is moved in, read only).
    unsafe {
        cmd.pre_exec(move || {
            // First out of the way of 3.., so that no source is overwritten before it is read.
            let mut moved = [0; 16];
            for (i, &fd) in fds.iter().enumerate().take(moved.len()) {
                let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                if high < 0 {
                    return Err(io::Error::last_os_error());
                }
                moved[i] = high;
            }
            for (i, &high) in moved.iter().enumerate().take(fds.len().min(16)) {
                // dup2 clears FD_CLOEXEC on the new descriptor.
                if libc::dup2(high, 3 + i as i32) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Own descriptor `fd`, which the old process passed to this one at that number
/// (`pass_fds`, handover.rs) and nothing else in this process holds.
pub fn own_fd(fd: std::os::fd::RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is open (passed across exec) and owned by no other value here.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}
