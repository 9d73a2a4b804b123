"""``python -m mlx_lora.studio``: one local web page to train, watch, chat and export.

The page is a thin layer over the commands: training and export run as the ordinary
``python -m mlx_lora.train`` / ``python -m mlx_lora.export`` in child processes, chat calls the
same generation function as ``python -m mlx_lora.chat``, and the data preview the same record
encoder as training. Standard library HTTP server, one static page, a vendored chart library
(uPlot, MIT): nothing to install beyond mlx_lora, nothing fetched from the network.
"""
