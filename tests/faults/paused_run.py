"""`lorapipe run` that stops inside the merged model's write, for the fault suite's kill during merge.

Once the merged weights are written (before the tokenizer, the model card and the merge record that completes the
folder), it prints PAUSED and sleeps: the test's SIGKILL then lands inside the write on every run, however fast the
steps before it got, instead of after a guessed delay.

    python -m tests.faults.paused_run run -c CONFIG
"""

import lorapipe  # noqa: F401  (first, as in the `lorapipe` command: its exit handler before any library's)

PAUSED = "PAUSED inside the merged model's write"


def main() -> None:
    import time

    from transformers import PreTrainedModel

    save_pretrained = PreTrainedModel.save_pretrained  # the merged model's; adapters are PeftModels

    def paused(self, *args, **kwargs):
        save_pretrained(self, *args, **kwargs)
        print(PAUSED, flush=True)
        time.sleep(300)

    PreTrainedModel.save_pretrained = paused
    from lorapipe_app.cli import entry

    entry()


if __name__ == "__main__":
    main()
