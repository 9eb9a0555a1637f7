//! Compiles the eBPF programs in the workspace's `bpf/` folder with clang into OUT_DIR; the
//! crate embeds the object. Fails with the name of the missing tool or header, since a
//! datapath without programs is useless.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SETUP_HINT: &str = "run scripts/setup.sh (installs clang, llvm, libbpf-dev, bpftool)";

fn main() {
    let (Some(manifest), Some(out_dir)) =
        (env::var_os("CARGO_MANIFEST_DIR"), env::var_os("OUT_DIR"))
    else {
        fail("CARGO_MANIFEST_DIR and OUT_DIR must be set (run through cargo)");
    };
    let bpf_dir = PathBuf::from(manifest).join("../../bpf");
    let out_dir = PathBuf::from(out_dir);
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());

    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed={}", bpf_dir.display());
    let sources = sources(&bpf_dir);
    for file in &sources {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        bpf_dir.join("warden.h").display()
    );

    match Command::new(&clang).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        _ => fail(&format!(
            "`{clang}` was not found or does not run; it compiles the eBPF programs in bpf/: \
             {SETUP_HINT}"
        )),
    }
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        fail(&format!(
            "/usr/include/bpf/bpf_helpers.h is missing (package libbpf-dev): {SETUP_HINT}"
        ));
    }

    // asm/types.h lives in the multiarch include folder on Debian.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".to_string());
    let multiarch = format!("/usr/include/{arch}-linux-gnu");

    let [main] = sources.as_slice() else {
        fail(&format!(
            "expected exactly one *.bpf.c program file in {} (found {})",
            bpf_dir.display(),
            sources.len()
        ));
    };
    let object = out_dir.join("warden.bpf.o");
    let output = Command::new(&clang)
        // v3: the compare-and-swap of the redirect slots (kernel 5.12 and later).
        .args(["-target", "bpf", "-mcpu=v3", "-O2", "-g", "-Wall"])
        .arg(format!("-I{multiarch}"))
        .arg(format!("-I{}", bpf_dir.display()))
        .arg("-c")
        .arg(main)
        .arg("-o")
        .arg(&object)
        .output();
    match output {
        Ok(out) if out.status.success() => {
            // Surface compiler warnings: cargo hides a build script's stderr on success.
            for line in String::from_utf8_lossy(&out.stderr).lines() {
                println!("cargo:warning=bpf: {line}");
            }
        }
        Ok(out) => {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            fail(&format!(
                "clang failed ({}) compiling {}; see the errors above",
                out.status,
                main.display()
            ))
        }
        Err(e) => fail(&format!("running {clang}: {e}: {SETUP_HINT}")),
    }
}

fn sources(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        fail(&format!("cannot read {}", dir.display()));
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    files.sort();
    files
}

fn fail(message: &str) -> ! {
    eprintln!("error: warden-datapath: {message}");
    panic!("warden-datapath build failed: {message}");
}
