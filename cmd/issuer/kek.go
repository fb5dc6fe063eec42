package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/spf13/cobra"

	"blindperso/issuer"
)

// The KEK commands: generate one (issuer kek), move every stored K_I from
// one KEK to another inside the token (issuer kek rotate), and destroy a
// KEK no blob is under any more (issuer kek destroy). docs/OPERATIONS.md,
// "KEK rotation", is the runbook.

func kekCmd() *cobra.Command {
	var label string
	c := &cobra.Command{
		Use:   "kek --token URI --label L [--so-pin-file FILE]",
		Short: "Generate the key-encryption key under which K_I is stored",
		Long: `Generate the KEK in the token: AES-256, a private token object,
sensitive, never extractable, wrap and unwrap only.

On a token that enforces CKA_WRAP_WITH_TRUSTED (SoftHSM2; see 'issuer
probe') every K_I can leave the token only wrapped under a key the
security officer marked CKA_TRUSTED, so this needs the SO PIN: from
--so-pin-file FILE, or from $BLINDPERSO_SO_PIN. Never on the command line.
The SO generates the KEK, trusted, as a session object; the user copies it
into a private, read-only token object, and the original is destroyed.

Every KEK carries an unwrap template (docs/HSM.md §6): a key unwrapped
under it is sensitive, can verify a MAC but not derive, encrypt, decrypt,
sign, wrap or unwrap, and can leave the token again only under a trusted
key (the next KEK, in issuer kek rotate). Other tokens do not need the SO
PIN.

` + uriHelp,
		Example: `  issuer kek --token "$BLINDPERSO_TOKEN" --label kek-2026 --so-pin-file /etc/blindperso/so.pin
  BLINDPERSO_SO_PIN="$(cat /run/secrets/so-pin)" issuer kek --label kek-2026`,
		Args: cobra.NoArgs,
	}
	open := tokenFlag(c)
	c.Flags().StringVar(&label, "label", "", "CKA_LABEL of the KEK (unique in the token)")
	readSOPIN := soPINFlag(c, "file holding the security officer's PIN")
	c.MarkFlagRequired("label")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		soPIN, err := readSOPIN()
		if err != nil {
			return err
		}
		tok, err := open(1)
		if err != nil {
			return err
		}
		defer tok.Close()
		kek, err := tok.GenerateKEK(cmd.Context(), label, soPIN)
		if err != nil {
			return err
		}
		trust := "not trusted (the token does not enforce CKA_WRAP_WITH_TRUSTED)"
		if kek.Trusted {
			trust = "CKA_TRUSTED, set by the security officer"
		}
		fmt.Fprintf(cmd.OutOrStdout(), "KEK %q generated in token %q: AES-256, %s\n", label, tok.Info().Label, trust)
		return nil
	}
	c.AddCommand(kekRotateCmd(), kekDestroyCmd())
	return c
}

func kekRotateCmd() *cobra.Command {
	var from, to string
	var workers int
	var asJSON bool
	c := &cobra.Command{
		Use:   "rotate --token URI --db DIR|DSN --from OLD --to NEW [--workers N] [--json]",
		Short: "Re-wrap every stored K_I from the KEK OLD to the KEK NEW, inside the token",
		Long: `Move every card key in the store from the KEK labelled OLD to the KEK
labelled NEW. For each card the token unwraps the stored blob under OLD
into a session key that can do nothing but be wrapped again, wraps it
under NEW (RFC 5649) and destroys it: K_I never leaves the token in the
clear. The store replaces a blob only by its re-wrap, in transactions of
up to 1024 cards, and only where the card's blob is still the one under
OLD: at any point, even after a crash or kill -9, every card is under
exactly one of the two KEKs. Run it again to finish an interrupted
rotation; a run with nothing left says "0 re-wrapped, N already under
NEW".

Stop the issuer service first (it verifies under one KEK), and start it
again with --kek NEW afterwards. On a token that enforces
CKA_WRAP_WITH_TRUSTED (SoftHSM2) NEW must be CKA_TRUSTED: generate it by
ceremony (kek-rotation) or with issuer kek and the SO PIN. A KEK made
before KEK rotation existed cannot give up its blobs (its unwrap template
forbids it): the command says so, and the way out is a new ceremony and a
new import of the batches. When no blob is left under OLD, destroy it with
issuer kek destroy. The command exits non-zero if a blob could not be
re-wrapped (it stays under OLD; the reason is printed).

` + uriHelp,
		Example: `  issuer kek rotate --token "$BLINDPERSO_TOKEN" --db /var/lib/blindperso-issuer --from kek-2026 --to kek-2027
  issuer kek rotate --db postgres://issuer@db.internal/issuer --from kek-2026 --to kek-2027 --workers 4 --json`,
		Args: cobra.NoArgs,
	}
	open := tokenFlag(c)
	openStore := dbFlag(c)
	c.Flags().StringVar(&from, "from", "", "label of the KEK the blobs are under now")
	c.Flags().StringVar(&to, "to", "", "label of the KEK to re-wrap them under")
	c.Flags().IntVar(&workers, "workers", 2, "token sessions working in parallel")
	c.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	c.MarkFlagRequired("from")
	c.MarkFlagRequired("to")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		if from == to {
			return fmt.Errorf("--from and --to are the same KEK %q: nothing to rotate", from)
		}
		if workers < 1 || workers > 64 {
			return fmt.Errorf("--workers %d: want 1 to 64", workers)
		}
		ctx := cmd.Context() // cancelled by SIGINT and SIGTERM (main)
		atLeastProcs(workers)
		tok, err := open(workers)
		if err != nil {
			return err
		}
		defer tok.Close()
		st, err := openStore(ctx) // after the token: a failing token leaves no new store
		if err != nil {
			return err
		}
		defer st.Close()
		old, err := tok.FindKEK(ctx, from)
		if err != nil {
			return fmt.Errorf("--from: %w", err)
		}
		next, err := tok.FindKEK(ctx, to)
		if err != nil {
			return fmt.Errorf("--to: %w (generate it first: by ceremony, kek-rotation, or with issuer kek)", err)
		}
		opt := issuer.RotateOptions{Workers: workers, Log: slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))}
		tty := isTerminal(cmd.ErrOrStderr())
		if tty && !asJSON {
			opt.Progress = func(p issuer.RotateProgress) {
				rate := float64(p.Rewrapped) / max(p.Elapsed.Seconds(), 1e-9)
				fmt.Fprintf(cmd.ErrOrStderr(), "\r%d of %d re-wrapped, %d failed (%.0f/s)   ", p.Rewrapped, p.Total, p.Failed, rate)
			}
		}
		res, rerr := issuer.Rotate(ctx, st, tok, old, next, opt)
		if opt.Progress != nil && res.Total > 0 {
			fmt.Fprintln(cmd.ErrOrStderr())
		}
		if asJSON {
			if err := printJSON(cmd, res); err != nil {
				return errors.Join(rerr, err)
			}
		} else {
			for _, f := range res.Failures {
				fmt.Fprintf(cmd.ErrOrStderr(), "card %x: not re-wrapped (stays under %s): %s\n", []byte(f.CardID), from, f.Reason)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "KEK rotation %s -> %s: %d re-wrapped, %d already under %s, %d failed; %d left under %s (%s)\n",
				from, to, res.Rewrapped, res.AlreadyDone, to, res.Failed, res.UnderFrom, from, time.Duration(res.Seconds*float64(time.Second)).Round(time.Millisecond))
		}
		if rerr != nil {
			if res.Total > 0 {
				return fmt.Errorf("%w\n(nothing is lost: every card is under %s or %s; run the command again to finish)", rerr, from, to)
			}
			return rerr
		}
		if res.Failed > 0 {
			return fmt.Errorf("%d of %d blobs could not be re-wrapped and stay under KEK %s (reasons above)", res.Failed, res.Total, from)
		}
		return nil
	}
	return c
}

func kekDestroyCmd() *cobra.Command {
	var label string
	c := &cobra.Command{
		Use:   "destroy --token URI --db DIR|DSN --label L",
		Short: "Destroy a KEK in the token once no stored blob is under it",
		Long: `Destroy the KEK labelled L in the token, after a KEK rotation moved every
card key away from it. The command refuses while any blob in the store
(--db) is wrapped under L, and says how many: destroying the KEK would lose
those cards' keys for good. It can check only the store it is given: if
several stores use the token, rotate all of them first.

` + uriHelp,
		Example: `  issuer kek destroy --token "$BLINDPERSO_TOKEN" --db /var/lib/blindperso-issuer --label kek-2026`,
		Args:    cobra.NoArgs,
	}
	open := tokenFlag(c)
	openStore := dbFlag(c)
	c.Flags().StringVar(&label, "label", "", "CKA_LABEL of the KEK to destroy")
	c.MarkFlagRequired("label")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		ctx := cmd.Context()
		tok, err := open(1)
		if err != nil {
			return err
		}
		defer tok.Close()
		st, err := openStore(ctx) // after the token: a failing token leaves no new store
		if err != nil {
			return err
		}
		defer st.Close()
		counts, err := st.KEKCounts(ctx)
		if err != nil {
			return err
		}
		if n := counts[label]; n > 0 {
			return fmt.Errorf("refused: %d card keys in this store are wrapped under KEK %q; destroying it would lose them: move them first (issuer kek rotate --from %s --to NEW)", n, label, label)
		}
		if err := tok.DestroyKEK(ctx, label); err != nil {
			return err
		}
		fmt.Fprintf(cmd.OutOrStdout(), "KEK %q destroyed in token %q (no blob in the store was under it)\n", label, tok.Info().Label)
		return nil
	}
	return c
}

// isTerminal reports whether w is a terminal (progress goes there only).
func isTerminal(w any) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
