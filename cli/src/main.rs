//! `drover`, the operator CLI: parse, run one command, map the error to an exit code.

use clap::Parser;
use drover_cli::{self as cli, Cli};

fn main() {
    let cli = Cli::parse();
    drover_identity::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("drover: error: cannot start the runtime: {err}");
            std::process::exit(cli::exit::FAILURE);
        }
    };
    if let Err(err) = runtime.block_on(cli::run(cli)) {
        eprintln!("drover: error: {err}");
        std::process::exit(err.exit_code());
    }
}
