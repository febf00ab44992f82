"""What a merged model folder carries besides its weights: the model card (README.md) and the Ollama Modelfile."""
