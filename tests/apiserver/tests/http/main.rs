//! The server driven over real HTTP by a small hyper client, as a Kubernetes client would.

mod client;

mod auth;
mod lifecycle;
mod list;
mod watch;
mod writes;
