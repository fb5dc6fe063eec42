// Command issuer is the issuer's side of blindperso: keys in a PKCS#11
// token, import of personalization batches, card authentication.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"blindperso/issuer"
	"blindperso/protocol"
)

func main() {
	// SIGINT and SIGTERM cancel the command's context: every command
	// stops through it (an import between groups, serve gracefully).
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := root().ExecuteContext(ctx)
	stop()
	if err != nil {
		os.Exit(exitCode(err))
	}
}

// exitCode is the issuer's classification of err as an exit code: 3 not
// found, 4 the card's state does not allow it, 5 a batch refused, 1
// anything else (docs/ISSUER.md). The API answers the same classes with
// 404, 409 and 422.
func exitCode(err error) int {
	kind, _ := issuer.Classify(err)
	return kind.ExitCode()
}

func root() *cobra.Command {
	c := &cobra.Command{
		Use:          "issuer",
		Short:        "blindperso issuer: keys in a PKCS#11 token, batch import, card authentication",
		SilenceUsage: true,
	}
	c.AddCommand(fingerprintCmd(), probeCmd(), auditCmd(), keygenCmd(), pubkeyCmd(), kekCmd(), importCmd(), exportCmd(), cardsCmd(), batchesCmd(), ceremonyCmd(), serveCmd())
	return c
}

func fingerprintCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "fingerprint PUBKEY.pem",
		Short: "Print the SHA-256 fingerprint of an issuer public key (PEM SubjectPublicKeyInfo)",
		Long: `Print SHA-256 of the DER SubjectPublicKeyInfo, in hex: the value a perso
operator passes to perso run --expect-fingerprint, and that cards can pin
at manufacture (vcard manufacture --pin).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			b, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			k, err := protocol.ParseIssuerKeyPEM(b)
			if err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%x\n", k.Fingerprint())
			return nil
		},
	}
}
