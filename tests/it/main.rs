//! Integration tests: real sockets on loopback, port 0, the stand-ins behaving like Mosaic.

mod cli;
mod config;
mod faults;
mod forwarding;
mod support;
mod tokens;
