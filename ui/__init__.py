"""segserve's web page: try the served model in a browser (Gradio, over segserve's client)."""
