//! Generates the protocol's Rust code from proto/warden/v1/agent.proto with protoc
//! (Debian package protobuf-compiler, installed by scripts/setup.sh).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/warden/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    if std::env::var_os("PROTOC").is_none() && which("protoc").is_none() {
        return Err(
            "protoc not found: install the Debian package protobuf-compiler \
                    (scripts/setup.sh does) or set PROTOC"
                .into(),
        );
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&[proto], &["proto"])?;
    Ok(())
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}
