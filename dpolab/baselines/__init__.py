"""The methods DPO is compared with in the paper's experiments: RLOO and PPO (RL on a reward), Unlikelihood."""
