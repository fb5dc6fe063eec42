// Command perso is the personalization station: it sends the issuer's
// public key to every card in the PC/SC readers, journals (Id, c) durably,
// locks the card, and leaves a batch and its manifest for the issuer.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := root().ExecuteContext(ctx); err != nil {
		os.Exit(1)
	}
}

func root() *cobra.Command {
	c := &cobra.Command{
		Use:   "perso",
		Short: "blindperso personalization station",
		Long: `perso drives PC/SC card readers: it sends the issuer's public key to each
card, collects the card's (Id, c), records it durably, and only then locks
the card. It holds no secret: the issuer key is public, c can be opened only
by the issuer's token, and the card keeps K_I. See docs/STATION.md.`,
		SilenceUsage: true,
	}
	c.AddCommand(runCmd(), sealCmd(), readersCmd(), uploadCmd())
	return c
}
