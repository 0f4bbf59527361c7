from mobilemllm.cli import run

run()
