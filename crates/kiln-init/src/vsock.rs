//! The guest channel over AF_VSOCK, for VMs whose only host channel is a vsock device
//! (Firecracker, whose hybrid vsock turns the agent's `CONNECT 52\n` on the VM's Unix socket into
//! a connection to this listener).
//!
//! kiln-init listens on [`VSOCK_CHANNEL_PORT`] for any CID and serves each accepted connection
//! exactly like a Unix-socket connection under runc: a newer connection replaces the older one.
//! A vsock stream socket is read, written and shut down like any stream socket, so the accepted
//! descriptor is held as a `File`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use crate::channel::{self, Conn, Shared};

pub(crate) use kiln_types::guest::VSOCK_CHANNEL_PORT;

/// One accepted vsock connection.
pub(crate) struct VsockStream(File);

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.0).read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Conn for VsockStream {
    fn try_clone_conn(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(Box::new(VsockStream(self.0.try_clone()?)))
    }
    fn close(&self) {
        // SAFETY: plain syscall on a descriptor this value owns.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// The address kiln-init binds: any CID (the guest's own), `port`.
fn any_cid(port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr
}

/// Binds the vsock listener and serves connections on a background thread.
pub(crate) fn listen(port: u32, shared: Arc<Shared>) -> std::io::Result<()> {
    // SAFETY: plain syscall; the descriptor is owned right after.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let listener = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = any_cid(port);
    // SAFETY: addr is a valid sockaddr_vm and the length is its size.
    let rc = unsafe {
        libc::bind(
            listener.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    // SAFETY: plain syscall on an owned descriptor.
    if rc != 0 || unsafe { libc::listen(listener.as_raw_fd(), 4) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::thread::spawn(move || loop {
        // SAFETY: plain syscall; a null address is allowed.
        let c = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        // SAFETY: c is a fresh descriptor returned by accept4.
        let stream = VsockStream(File::from(unsafe { OwnedFd::from_raw_fd(c) }));
        let Ok(reader) = stream.0.try_clone() else {
            continue;
        };
        channel::serve_accepted(stream, VsockStream(reader), &shared);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_address_is_any_cid_on_the_channel_port() {
        let a = any_cid(VSOCK_CHANNEL_PORT);
        assert_eq!(a.svm_family, libc::AF_VSOCK as libc::sa_family_t);
        assert_eq!(a.svm_port, 52);
        assert_eq!(a.svm_cid, u32::MAX);
    }
}
