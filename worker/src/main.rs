//! `worker`: one rank of a cxrclip run, as its own executable (for nodes other than the
//! coordinator's; the coordinator runs the same code as `coordinator worker`). See
//! [`worker::cli`].

use clap::Parser;

fn main() {
    std::process::exit(worker::cli::main_with(worker::cli::Args::parse()));
}
