"""Weight sync to the vLLM server after every optimizer step, and the check that it arrived."""
