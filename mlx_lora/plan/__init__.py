"""Will a run fit? Memory footprint from config.json, the machine's budget, the checkpointing
decision."""
