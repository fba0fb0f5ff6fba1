//! Compiles `proto/augur/v1/*.proto` with prost, using a vendored protoc so that no
//! system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/augur/v1/event.proto",
        "proto/augur/v1/prediction.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    prost_build::Config::new().compile_protos(&protos, &["proto"])?;
    Ok(())
}
