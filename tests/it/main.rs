//! Integration tests: real sockets on loopback, port 0, the stand-ins behaving like Mosaic.

mod access;
mod amplify;
mod cli;
mod config;
mod deploy;
mod faults;
mod forwarding;
mod hostile;
mod lifecycle;
mod listener_tls;
mod logs;
mod operations;
mod parser;
mod rejections;
mod rig;
mod soak;
mod status_page;
mod support;
mod tls;
mod tokens;
