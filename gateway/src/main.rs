//! The `wardgate` binary. Exit codes are listed in [`wardgate::cli`].

fn main() -> std::process::ExitCode {
    wardgate::cli::main()
}
