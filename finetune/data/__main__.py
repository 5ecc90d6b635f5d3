from finetune.data.cli import main

main()
