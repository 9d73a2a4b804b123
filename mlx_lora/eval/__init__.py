"""Did it help? Base vs tuned loss and answers, and the quality of quantized exports."""
