//! Generates the tonic/prost code for `drover.v1` with a vendored protoc (or `$PROTOC` when set).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => std::path::PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    println!("cargo:rerun-if-changed=proto/drover/v1/drover.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/drover/v1/drover.proto"],
        &["proto"],
    )?;
    Ok(())
}
