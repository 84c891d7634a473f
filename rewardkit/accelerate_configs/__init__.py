"""accelerate configurations shipped with rewardkit, selectable by name."""
