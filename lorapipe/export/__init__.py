"""What a merged model folder carries besides its weights: the model card (README.md), the Ollama Modelfile and,
for a model that generates, a generation config that stops at every end token."""
