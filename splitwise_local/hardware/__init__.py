"""What this machine is (CPU model, ISA flags, GPUs) and what runs fastest on it."""
