"""Development tools around the agent, not part of its runtime: the local demo and its embedded broker, test-video
generation, benches."""
