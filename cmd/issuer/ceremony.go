package main

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	"blindperso/ceremony"
)

func ceremonyCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "ceremony",
		Short: "Run a key ceremony from a script, or verify its signed transcript",
		Long: `A key ceremony creates the issuer keys, the KEK and a transcript signing key
in the token, exports the public keys with their SHA-256 fingerprints and
the pinned-fingerprint file for the card manufacturer, and writes a
transcript of every step signed by the token. See docs/OPERATIONS.md and
examples/ceremony-*.yaml.`,
	}
	c.AddCommand(ceremonyRunCmd(), ceremonyVerifyCmd())
	return c
}

func ceremonyRunCmd() *cobra.Command {
	var dryRun bool
	c := &cobra.Command{
		Use:   "run [--dry-run] SCRIPT.yaml",
		Short: "Run the ceremony a YAML script describes",
		Long: `Run the ceremony a YAML script describes (strict: an unknown key is an
error). Before anything is created it probes the token and refuses a
profile the token cannot run in-token, a label already in the token, or an
output file that exists. Every output file is created exclusively: none is
ever overwritten. PINs come from the token URI's pin-source and from the
script's token.so-pin (file or env), never from the script or argv.
--dry-run does all the checks, prints every step it would take, and
creates nothing.

` + uriHelp,
		Example: `  issuer ceremony run --dry-run examples/ceremony-softhsm2.yaml
  issuer ceremony run examples/ceremony-softhsm2.yaml`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := ceremony.Load(args[0])
			if err != nil {
				return err
			}
			res, err := ceremony.Run(context.Background(), s, ceremony.Options{DryRun: dryRun, Log: cmd.OutOrStdout()})
			if err != nil {
				return err
			}
			if res != nil {
				fmt.Fprintf(cmd.OutOrStdout(), "ceremony %q completed; transcript %s (signing key sha256 %s)\n",
					s.Ceremony, res.Transcript, res.Body.TranscriptKey.Fingerprint)
			}
			return nil
		},
	}
	c.Flags().BoolVar(&dryRun, "dry-run", false, "check everything and print the steps; create nothing")
	return c
}

func ceremonyVerifyCmd() *cobra.Command {
	var keyFile, expect string
	c := &cobra.Command{
		Use:   "verify [--key KEY.pem] [--expect-key-fingerprint HEX] TRANSCRIPT.json",
		Short: "Verify a ceremony transcript's signature and output hashes (no token needed)",
		Long: `Check the transcript's signature with the transcript key's public key (by
default the key file named in the transcript, beside it), and the SHA-256
of every output file it lists (relative to the transcript's directory).
Give --expect-key-fingerprint the fingerprint written down at the ceremony
so that a substituted key file is caught too. Fails naming every
difference.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			res, err := ceremony.Verify(args[0], keyFile, expect)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: signature OK (key %s, sha256 %s), status %s, %d outputs match\n",
				args[0], res.KeyFile, res.KeyFingerprint, res.Body.Status, len(res.Body.Outputs))
			return nil
		},
	}
	c.Flags().StringVar(&keyFile, "key", "", "transcript key (PEM SPKI); default: the one the transcript names, beside it")
	c.Flags().StringVar(&expect, "expect-key-fingerprint", "", "SHA-256 (hex) the transcript key must have")
	return c
}
