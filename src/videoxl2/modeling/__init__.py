"""The network: vision tower, DTS, projector and the assembled VideoXL2ForCausalLM."""
