from i2p2i_bot.cli import main

raise SystemExit(main())
