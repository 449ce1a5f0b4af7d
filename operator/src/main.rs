fn main() -> anyhow::Result<()> {
    anyhow::bail!("ferry-operator: the reconcilers are not built yet")
}
