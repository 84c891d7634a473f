"""The method recipes (TOML). This folder also ships inside the package as `rewardkit.recipes`, so `rewardkit run NAME` finds them after a plain pip install."""
