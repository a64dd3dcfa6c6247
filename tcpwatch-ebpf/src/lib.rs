//! Empty library target: lets `tcpwatch` depend on this crate so cargo rebuilds it on change.
#![no_std]
