"""Entry point frozen by PyInstaller as /init of the initramfs."""
from guest_init.agent import main

main()
