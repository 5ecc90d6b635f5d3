from finetune.export import main

main()
