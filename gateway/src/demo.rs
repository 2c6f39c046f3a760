pub async fn run(_dir: Option<std::path::PathBuf>, _d: std::time::Duration) -> anyhow::Result<()> { Ok(()) }
