package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"blindperso/hsm"
	"blindperso/issuer"
	"blindperso/pinholder"
)

// weakKeyGate adds --accept-weak-keys and returns the check import and
// serve run on their keys before any work: keys whose attributes open a
// path the token could have closed are refused, naming key, attribute
// and fix, unless the flag accepts the risk (then every finding is logged
// at every start). Paths the token cannot close are a warning, always.
func weakKeyGate(c *cobra.Command) func(context.Context, *issuer.Issuer) error {
	accept := c.Flags().Bool("accept-weak-keys", false, "start even if the keys' attributes let a holder of the user PIN take K_I out where the token could have stopped it (logged at every start; see issuer audit)")
	return func(ctx context.Context, is *issuer.Issuer) error {
		log := slog.New(slog.NewTextHandler(c.ErrOrStderr(), nil))
		fs, err := is.Token.Audit(ctx, []*hsm.IssuerKeyRef{is.Key}, is.KEK, nil)
		if err != nil {
			return err
		}
		if len(fs) > 0 && !*accept {
			lines := make([]string, len(fs))
			for i, f := range fs {
				lines[i] = "  " + f.String()
			}
			return fmt.Errorf("refusing to start: the keys let a holder of the user PIN take K_I out, where token %q could have stopped it:\n%s\n(run `issuer audit` for the list; --accept-weak-keys starts anyway, logging this at every start)",
				is.Token.Info().Label, strings.Join(lines, "\n"))
		}
		for _, f := range fs {
			log.Warn("weak key accepted (--accept-weak-keys)", "key", f.Key, "attribute", f.Attribute, "have", f.Have, "want", f.Want, "fix", f.Fix)
		}
		warnOpenPaths(log, is.Token)
		return nil
	}
}

// warnOpenPaths logs the paths out that the token itself cannot close.
func warnOpenPaths(log *slog.Logger, tok *hsm.Token) {
	m := tok.Mechanisms()
	if m.OpenPaths == nil {
		log.Warn("this token's resistance to a holder of the user PIN has not been measured: run `issuer probe --so-pin-file FILE` and add its open paths to the token table (docs/HSM.md §5)", "token", tok.Info().Label, "table", m.Name)
		return
	}
	if len(m.OpenPaths) > 0 {
		log.Warn("the token cannot close these ways out for a holder of the user PIN, whatever the key attributes (issuer probe shows each)",
			"token", tok.Info().Label, "table", m.Name, "open_paths", strings.Join(m.OpenPaths, ","))
	}
}

func auditCmd() *cobra.Command {
	var keys []string
	var kek, transcript string
	var asJSON bool
	c := &cobra.Command{
		Use:   "audit --token URI [--key L ...] [--kek L] [--transcript-key L] [--json]",
		Short: "Check a deployment's live keys against the key policy: what lets a PIN holder out",
		Long: `Read the attributes of the deployment's keys in the token (issuer keys,
KEK, transcript key; never a value, nothing is changed) and print every
attribute that lets a holder of the user PIN take S or K_I out where the
token could have stopped it — CKA_MODIFIABLE true, a usage the chain does
not need, a missing CKA_UNWRAP_TEMPLATE, an untrusted KEK on a token that
enforces CKA_WRAP_WITH_TRUSTED — with the fix: a new key ceremony for an
issuer or transcript key, a KEK rotation (issuer kek rotate) for the KEK.
Then the ways out this token cannot close whatever the attributes (its
table's open paths; issuer probe measures them).

Exits 1 if any key is weak. issuer serve and issuer import refuse to start
on such keys unless --accept-weak-keys. See docs/HSM.md §6.

` + uriHelp,
		Example: `  issuer audit --key issuer-2026-rsa --key issuer-2026-ec --kek kek-2026 --transcript-key ceremony-2026-transcript`,
		Args:    cobra.NoArgs,
	}
	open := tokenFlag(c)
	c.Flags().StringArrayVar(&keys, "key", nil, "label of an issuer key (repeatable)")
	c.Flags().StringVar(&kek, "kek", "", "label of the KEK")
	c.Flags().StringVar(&transcript, "transcript-key", "", "label of the ceremony's transcript signing key")
	c.Flags().BoolVar(&asJSON, "json", false, "print the findings as JSON")
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		if len(keys) == 0 && kek == "" && transcript == "" {
			return errors.New("nothing to audit: give --key, --kek and/or --transcript-key")
		}
		ctx := cmd.Context()
		tok, err := open(1)
		if err != nil {
			return err
		}
		defer tok.Close()
		var refs []*hsm.IssuerKeyRef
		for _, l := range keys {
			k, err := tok.FindIssuerKey(ctx, l)
			if err != nil {
				return err
			}
			refs = append(refs, k)
		}
		var kr *hsm.KEKRef
		if kek != "" {
			if kr, err = tok.FindKEK(ctx, kek); err != nil {
				return err
			}
		}
		var tk *hsm.SigningKey
		if transcript != "" {
			if tk, err = tok.FindSigningKey(ctx, transcript); err != nil {
				return err
			}
		}
		fs, err := tok.Audit(ctx, refs, kr, tk)
		if err != nil {
			return err
		}
		out := cmd.OutOrStdout()
		if asJSON {
			enc := json.NewEncoder(out)
			enc.SetIndent("", "  ")
			if err := enc.Encode(map[string]any{"token": tok.Info().Label, "findings": append([]hsm.Finding{}, fs...), "open_paths": tok.Mechanisms().OpenPaths}); err != nil {
				return err
			}
		} else {
			for _, f := range fs {
				fmt.Fprintf(out, "WEAK  %s\n", f)
			}
			if len(fs) == 0 {
				fmt.Fprintf(out, "keys as the key policy makes them on token %q: nothing a PIN holder could use that the token could have closed\n", tok.Info().Label)
			}
			if p := tok.Mechanisms().OpenPaths; len(p) > 0 {
				fmt.Fprintf(out, "the token cannot close (issuer probe shows each): %s\n", strings.Join(p, ", "))
			}
		}
		if len(fs) > 0 {
			return fmt.Errorf("%d weak attribute(s)", len(fs))
		}
		return nil
	}
	return c
}

// soPINFlag adds --so-pin-file and returns a function reading the SO PIN
// from it or from $BLINDPERSO_SO_PIN ("" if neither).
func soPINFlag(c *cobra.Command, usage string) func() (string, error) {
	file := c.Flags().String("so-pin-file", "", usage+" (default $"+envSOPIN+")")
	return func() (string, error) {
		if *file == "" {
			return os.Getenv(envSOPIN), nil
		}
		b, err := os.ReadFile(*file)
		if err != nil {
			return "", fmt.Errorf("SO PIN: %w", err)
		}
		return strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r"), nil
	}
}

// probeWithPINHolder runs the adversary after the probe (probe --so-pin-file).
func probeWithPINHolder(ctx context.Context, tok *hsm.Token, uri, soPIN string) (*pinholder.Report, error) {
	cfg, err := hsm.ParseURI(uri)
	if err != nil {
		return nil, err
	}
	return pinholder.Run(ctx, tok, pinholder.Options{UserPIN: cfg.PIN, SOPIN: soPIN})
}
