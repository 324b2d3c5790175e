"""Language-model agents: client, prompts, answers, store and fitted maps."""
